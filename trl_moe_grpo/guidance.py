"""Modality-aware router guidance (`docs/design.md` §2, paper eq. 7).

Per MoE layer, count how often each expert is in the top-K of vision tokens and of text tokens over a calibration set,
turn the counts into modality scores, and remove from each modality's sampling distribution the experts that modality
rarely uses (the bottom `P` of them; `P = 0.25` by default). The masks shape which experts rollouts may *draw*; the
mixing weights, inference and evaluation are untouched.

The statistics live in a JSON file (never pickle) with the model's identity, so a file made for another model is
refused instead of silently masking the wrong experts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data_utils import calibration_batches
from .errors import MoEGRPOError
from .routing.controller import TEXT, VISION, RoutingController
from .routing.introspection import model_identity

FORMAT = "trl-moe-grpo/modality-statistics"
FORMAT_VERSION = 1
MODALITIES = {TEXT: "text", VISION: "vision"}


def modality_scores(counts: torch.Tensor) -> torch.Tensor:
    """Eq. 7: `[layers, 2, experts]` counts -> the normalized scores `ŝ_t`, `ŝ_v` of the same shape.

    `s_m = N_m / sum_e N_m` per layer, then `ŝ_m = s_m / (s_t + s_v)`. An expert neither modality chose scores 0 for
    both; a modality with no tokens at all scores 0 everywhere.
    """
    counts = counts.double()
    shares = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)
    total = shares.sum(1, keepdim=True)
    return torch.where(total > 0, shares / total.clamp(min=1e-300), torch.zeros_like(shares))


def modality_masks(scores: torch.Tensor, mask_ratio: float, top_k: int, present: torch.Tensor) -> torch.Tensor:
    """`[layers, 2, experts]` bool, True where the modality may draw the expert.

    For each layer and modality, the `floor(mask_ratio * N)` lowest-scoring experts are masked, never leaving fewer
    than `top_k`. Ties go by expert id (the lower id is masked first), so the result is deterministic. A modality that
    is not `present` (no tokens seen in calibration) keeps every expert.
    """
    num_experts = scores.shape[-1]
    num_masked = min(math.floor(mask_ratio * num_experts), num_experts - top_k)
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if num_masked <= 0:
        return allowed
    order = torch.sort(scores, dim=-1, stable=True).indices  # ascending score, ties by expert id
    allowed.scatter_(-1, order[..., :num_masked], False)
    allowed[:, ~present.bool()] = True
    return allowed


@dataclass
class ModalityStatistics:
    """Top-K usage counts per layer, modality and expert, with the identity of the model they were measured on.

    Attributes:
        counts: `[layers, 2, experts]` int64; index 0 is text, 1 is vision.
        model: `architecture`, `num_layers`, `num_experts`, `top_k` and `router_layers` of the model.
        num_samples: how many calibration prompts produced the counts.
        mask_ratio: the `P` the file was saved with (its `masked` lists use it), `None` before the first save;
            `masks`, `to_json` and `save` use it when given no ratio.
        extra: other top-level entries of the file, kept as they are.
    """

    counts: torch.Tensor
    model: dict[str, Any]
    num_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    mask_ratio: float | None = None

    @property
    def present(self) -> torch.Tensor:
        """`[2]` bool: whether calibration saw any token of each modality."""
        return self.counts.sum(dim=(0, 2)) > 0

    def scores(self) -> torch.Tensor:
        return modality_scores(self.counts)

    def _ratio(self, mask_ratio: float | None) -> float:
        if mask_ratio is not None:
            return mask_ratio
        if self.mask_ratio is None:
            raise MoEGRPOError(
                "These modality statistics carry no mask ratio (they were not loaded from a saved file): pass "
                "`mask_ratio=` (the `modality_mask_ratio` P, e.g. 0.25)."
            )
        return self.mask_ratio

    def masks(self, mask_ratio: float | None = None) -> torch.Tensor:
        """`[layers, 2, experts]` bool, the experts each modality may draw under `mask_ratio` (default: the file's)."""
        return modality_masks(self.scores(), self._ratio(mask_ratio), self.model["top_k"], self.present)

    def check_model(self, model: torch.nn.Module, controller: RoutingController) -> None:
        """Raise unless these statistics were measured on a model of the same shape as `model`."""
        mine = model_identity(model, controller)
        keys = ("architecture", "num_layers", "num_experts", "top_k")
        if any(self.model.get(k) != mine[k] for k in keys):
            theirs = ", ".join(f"{k}={self.model.get(k)}" for k in keys)
            ours = ", ".join(f"{k}={mine[k]}" for k in keys)
            raise MoEGRPOError(
                f"These modality statistics were made for another model ({theirs}); this model has {ours}. "
                "Calibrate this model: `trl-moe-grpo calibrate MODEL --dataset ... --output stats.json`, or leave "
                "`modality_stats_path` unset to let the trainer calibrate before training."
            )

    def to_json(self, mask_ratio: float | None = None) -> dict[str, Any]:
        mask_ratio = self._ratio(mask_ratio)
        scores, masks = self.scores(), self.masks(mask_ratio)
        layers = []
        for layer, name in enumerate(self.model["router_layers"]):
            layers.append(
                {
                    "layer": layer,
                    "router": name,
                    "counts": {MODALITIES[m]: self.counts[layer, m].tolist() for m in MODALITIES},
                    "scores": {MODALITIES[m]: [round(v, 6) for v in scores[layer, m].tolist()] for m in MODALITIES},
                    "masked": {MODALITIES[m]: (~masks[layer, m]).nonzero().flatten().tolist() for m in MODALITIES},
                }
            )
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.model,
            "mask_ratio": mask_ratio,
            "num_samples": self.num_samples,
            "tokens": {MODALITIES[m]: int(self.counts[0, m].sum()) // self.model["top_k"] for m in MODALITIES},
            **self.extra,
            "layers": layers,
        }

    def save(self, path: str | Path, mask_ratio: float | None = None) -> None:
        """Write the JSON file; `mask_ratio` (default: the loaded one) decides its `masked` lists and is kept in it."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(mask_ratio), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ModalityStatistics:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise MoEGRPOError(f"Cannot read modality statistics from {path}: {error}.") from error
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise MoEGRPOError(
                f"{path} is not a trl-moe-grpo modality statistics file (format {FORMAT!r} version {FORMAT_VERSION}); "
                "write one with `trl-moe-grpo calibrate`."
            )
        counts = torch.tensor(
            [[layer["counts"][MODALITIES[m]] for m in MODALITIES] for layer in data["layers"]], dtype=torch.long
        )
        written = {"format", "version", "model", "mask_ratio", "num_samples", "tokens", "layers"}
        return cls(
            counts=counts,
            model=data["model"],
            num_samples=data.get("num_samples", 0),
            extra={key: value for key, value in data.items() if key not in written},
            mask_ratio=data.get("mask_ratio"),
        )


@torch.no_grad()
def count_top_k_by_modality(
    model: torch.nn.Module, controller: RoutingController, batches: Iterable[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """Run `model` on each batch of inputs with stock top-K routing; count `[layers, 2, experts]` expert uses.

    Padding (`attention_mask == 0`) is not counted. A token is vision when its id is one of the controller's vision
    token ids.
    """
    counts = torch.zeros(controller.num_layers, 2, controller.num_experts, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            with controller.capture(selection_probs=False) as recording:
                model(**batch)
            routes = recording.steps[0].long().cpu()  # [batch, tokens, layers, top_k]
            modality = controller.token_modality(batch["input_ids"]).long().cpu()
            valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool().cpu()
            for m in MODALITIES:
                chosen = routes[valid & (modality == m)]  # [tokens, layers, top_k]
                one_hot = torch.nn.functional.one_hot(chosen, controller.num_experts)  # [tokens, L, K, N]
                counts[:, m] += one_hot.sum(dim=(0, 2))
    finally:
        model.train(was_training)
    return counts


def calibrate(
    model: torch.nn.Module,
    controller: RoutingController,
    processing_class,
    rows: list[dict[str, Any]],
    batch_size: int = 8,
    progress: bool = False,
) -> ModalityStatistics:
    """Measure the modality statistics of `model` on the prompts of `rows` (no gradients, stock top-K)."""
    batches = calibration_batches(processing_class, rows, batch_size, next(model.parameters()).device)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=math.ceil(len(rows) / batch_size), desc="calibrating", unit="batch")
    counts = count_top_k_by_modality(model, controller, batches)
    return ModalityStatistics(counts=counts, model=model_identity(model, controller), num_samples=len(rows))
