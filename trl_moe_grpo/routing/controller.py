"""One routing controller per model: hooks on every router module, switched by mode.

The controller installs a forward hook on each MoE router (found by class, see `adapters.py`) and one forward
pre-hook on the model itself. The hooks do nothing in `topk` mode, so a model with a controller computes exactly what
the stock model computes. The other modes replace the router's `(weights, indices)` output before the experts run:

- `sample`: Gumbel-top-K draws from the selection distribution (optionally modality-masked), recorded as a trace;
- `noise`: Gaussian noise on the selection log-scores, then top-K (the Stoch-FT-Noise baseline), recorded too;
- `replay`: the recorded expert ids of a trace; mixing weights and logits come from the live router, so gradients
  reach it. Each replayed forward also *captures* the live logits and the routed sets for the losses.

Traces are `[batch, tokens, layers, top_k]` int16 tensors laid out like the token ids (see `traces.py`); `-1` marks a
token with no recorded route, which takes the live top-K and is left out of every routing loss.

State is per controller (so per model: a policy and a reference model in one process do not share it), and replay
state lives until `step_scope()` exits, because with gradient checkpointing the routers run again during backward.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import MoEGRPOError
from .adapters import RouterAdapter, find_routers
from .sampling import gumbel_top_k, noisy_top_k

RolloutRouting = Literal["topk", "sample", "noise"]

TEXT, VISION = 0, 1


@dataclass
class LayerCapture:
    """What one MoE layer did in a replayed forward, rows in `(batch, token)` order.

    Attributes:
        logits: `[rows, num_experts]` live router logits (carry gradients in training).
        recorded: `[rows, top_k]` the trace's expert ids, live top-K where the trace had `-1`.
        dispatched: `[rows, top_k]` the experts the tokens were actually sent to.
        top_k: `[rows, top_k]` the live router's stock choice.
        valid: `[rows]` whether the trace had a route for the token.
    """

    logits: torch.Tensor
    recorded: torch.Tensor
    dispatched: torch.Tensor
    top_k: torch.Tensor
    valid: torch.Tensor


@dataclass
class RolloutRecording:
    """Routes drawn during a generation: one entry per model call (prefill, then one per decoded token).

    Attributes:
        steps: `[batch, tokens_in_call, layers, top_k]` int16 tensors, in call order.
    """

    steps: list[torch.Tensor]


class RoutingController:
    """Sampled routing, trace recording and replay for the MoE routers of one model.

    Args:
        model (`nn.Module`):
            The model to control (the unwrapped `PreTrainedModel`; for PEFT models, the base model).
        vision_token_ids (`Sequence[int]`, *optional*):
            Token ids counted as vision tokens for modality masks (the processor's image/video placeholders).
    """

    def __init__(self, model: nn.Module, vision_token_ids: Sequence[int] = ()):
        routers = find_routers(model)
        self.layer_names = [name for name, _, _ in routers]
        self.adapters: list[RouterAdapter] = [adapter for _, _, adapter in routers]
        shapes = {(a.num_experts, a.top_k) for a in self.adapters}
        if len(shapes) != 1:
            raise MoEGRPOError(
                f"The MoE layers of `{type(model).__name__}` disagree on (num_experts, top_k): {sorted(shapes)}. "
                "Routing traces need one shape for every layer."
            )
        ((self.num_experts, self.top_k),) = shapes
        self.num_layers = len(self.adapters)
        self.vision_token_ids = torch.tensor(sorted(set(vision_token_ids)), dtype=torch.long)

        self.mode: Literal["topk", "sample", "noise", "replay"] = "topk"
        self.noise_std = 1.0
        self.expert_masks: torch.Tensor | None = None  # [layers, 2, experts] bool: True = may be drawn
        self._recording: RolloutRecording | None = None
        self._call_shape: tuple[int, int] | None = None
        self._call_modality: torch.Tensor | None = None
        self._routes: torch.Tensor | None = None
        self._dispatch_recorded = True
        self._cursor = 0
        self._chunk: torch.Tensor | None = None
        self._chunk_start = 0
        self._captures: dict[tuple[int, int], LayerCapture] = {}

        self._handles = [
            module.register_forward_hook(functools.partial(self._on_router, layer))
            for layer, (_, module, _) in enumerate(routers)
        ]
        self._handles.append(model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))

    # ------------------------------------------------------------------ public API

    def remove(self) -> None:
        """Remove every hook; the model is stock again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def router_parameters(self) -> list[nn.Parameter]:
        """The parameters of every router module (the gates MoE-GRPO trains), in layer order."""
        return [p for adapter in self.adapters for p in adapter.router.parameters()]

    def set_expert_masks(self, masks: torch.Tensor | None) -> None:
        """Per-layer, per-modality experts that sampling may draw: `[layers, 2, experts]` bool (True = allowed)."""
        if masks is not None:
            expected = (self.num_layers, 2, self.num_experts)
            if tuple(masks.shape) != expected:
                raise MoEGRPOError(f"Expert masks have shape {tuple(masks.shape)}, expected {expected}.")
            fewest = int(masks.sum(-1).min())
            if fewest < self.top_k:
                raise MoEGRPOError(
                    f"An expert mask leaves {fewest} experts for some layer and modality, fewer than top_k="
                    f"{self.top_k}: sampling could not draw a full set. Lower the mask ratio."
                )
            masks = masks.bool()
        self.expert_masks = masks

    @contextlib.contextmanager
    def rollout(self, routing: RolloutRouting, noise_std: float = 1.0) -> Iterator[RolloutRecording]:
        """Route with `routing` and record every call's expert ids while the context is open."""
        if routing not in ("topk", "sample", "noise"):
            raise MoEGRPOError(f"Unknown rollout routing {routing!r}: use 'topk', 'sample' or 'noise'.")
        previous = self.mode
        recording = RolloutRecording(steps=[])
        self.mode, self.noise_std, self._recording = routing, noise_std, recording
        try:
            yield recording
        finally:
            self.mode, self._recording, self._call_shape = previous, None, None

    @contextlib.contextmanager
    def step_scope(self) -> Iterator[None]:
        """Bound the lifetime of replay state: a training step's forward *and* backward (checkpoint recompute)."""
        try:
            yield
        finally:
            self.mode = "topk"
            self._routes = self._chunk = None
            self._captures.clear()
            self._call_shape = None

    def start_replay(self, routes: torch.Tensor, dispatch: bool = True) -> None:
        """Replay `routes` (`[batch, tokens, layers, top_k]`) in the next model calls, consumed in row order.

        With `dispatch=False` the tokens go to the live top-K (no replay) but the recorded sets are still captured
        for the routing losses: the "no replay" ablation.
        """
        self.check_routes(routes)
        self.mode, self._routes, self._dispatch_recorded = "replay", routes, dispatch
        self._cursor, self._chunk = 0, None
        self._captures.clear()

    def finish_replay(self) -> None:
        """Check that the model calls since `start_replay` consumed every row of the trace."""
        if self._routes is not None and self._cursor != self._routes.shape[0]:
            raise MoEGRPOError(
                f"Replay consumed {self._cursor} of {self._routes.shape[0]} trace rows: the model was called on a "
                "different batch than the trace was given for."
            )

    def captures(self) -> list[LayerCapture]:
        """The captures of the last replay, per layer, rows of all calls concatenated in batch order."""
        if not self._captures:
            raise MoEGRPOError("No replayed forward was captured: call `start_replay` and run the model first.")
        starts = sorted({start for start, _ in self._captures})
        per_layer = []
        for layer in range(self.num_layers):
            parts = [self._captures[(start, layer)] for start in starts]
            per_layer.append(
                LayerCapture(*(torch.cat([getattr(p, f) for p in parts]) for f in LayerCapture.__dataclass_fields__))
            )
        return per_layer

    def token_modality(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`1` where `input_ids` is a vision placeholder token, else `0` (same shape, int8)."""
        if self.vision_token_ids.numel() == 0:
            return torch.zeros_like(input_ids, dtype=torch.int8)
        return torch.isin(input_ids, self.vision_token_ids.to(input_ids.device)).to(torch.int8)

    def check_routes(self, routes: torch.Tensor) -> None:
        """Raise unless `routes` is a well-formed trace for this model."""
        if routes.dim() != 4 or routes.shape[2:] != (self.num_layers, self.top_k):
            raise MoEGRPOError(
                f"Routing trace has shape {tuple(routes.shape)}; this model needs [batch, tokens, {self.num_layers}, "
                f"{self.top_k}] ({self.num_layers} MoE layers, top_k={self.top_k})."
            )
        if routes.is_floating_point():
            raise MoEGRPOError(f"Routing trace has dtype {routes.dtype}; expert ids are integers (int16).")
        if routes.numel() == 0:
            return
        if int(routes.min()) < -1 or int(routes.max()) >= self.num_experts:
            raise MoEGRPOError(
                f"Routing trace holds expert ids in [{int(routes.min())}, {int(routes.max())}]; valid ids are -1 "
                f"(no route) and 0..{self.num_experts - 1}."
            )
        missing = routes < 0
        if not torch.equal(missing.any(dim=(-1, -2)), missing.all(dim=(-1, -2))):
            raise MoEGRPOError(
                "Routing trace marks only some layers or slots of a token with -1: a token has a route in every "
                "layer or in none."
            )

    # ------------------------------------------------------------------ hooks

    def _on_model_call(self, module, args, kwargs):
        if self.mode == "topk" and self._recording is None:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            batch, length = input_ids.shape[:2]
            modality = self.token_modality(input_ids).reshape(-1)
        else:
            batch, length = kwargs["inputs_embeds"].shape[:2]
            modality = None
        self._call_shape, self._call_modality = (batch, length), modality

        if self._recording is not None:
            device = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).device
            self._recording.steps.append(
                torch.full((batch, length, self.num_layers, self.top_k), -1, dtype=torch.int16, device=device)
            )
        if self.mode == "replay":
            if self._cursor > 0 and torch.is_grad_enabled():
                # Checkpoint recompute re-runs the routers during backward but not this pre-hook, so it could only
                # see the last call's rows. One call per trace keeps recompute exact (TRL's training forward is one).
                raise MoEGRPOError(
                    "A trace can be replayed over several model calls only without gradients (e.g. chunked no-grad "
                    "scoring). With gradients, run the model once on the whole trace."
                )
            chunk = self._routes[self._cursor : self._cursor + batch]
            if chunk.shape[:2] != (batch, length):
                raise MoEGRPOError(
                    f"The model was called on {batch} sequences of {length} tokens, but the routing trace has "
                    f"{chunk.shape[0]} rows of {chunk.shape[1]} tokens left at row {self._cursor}: trace and token "
                    "ids are misaligned."
                )
            self._chunk, self._chunk_start = chunk, self._cursor
            self._cursor += batch
        return None

    def _on_router(self, layer: int, module: nn.Module, args, output):
        if self.mode == "topk" and self._recording is None:
            return None
        logits, weights, indices = output
        adapter = self.adapters[layer]
        if self._call_shape is None or self._call_shape[0] * self._call_shape[1] != logits.shape[0]:
            raise MoEGRPOError(
                f"Router `{self.layer_names[layer]}` saw {logits.shape[0]} tokens outside a model call the "
                "controller tracked; call the model the controller was built for, not a submodule."
            )

        if self.mode == "replay":
            return self._replay(layer, adapter, logits, weights, indices)
        if self.mode in ("sample", "noise"):
            log_probs = self._masked(adapter.selection_log_probs(logits), layer)
            if self.mode == "sample":
                indices = gumbel_top_k(log_probs, self.top_k)
            else:
                indices = noisy_top_k(log_probs, self.top_k, self.noise_std)
            weights = adapter.mixing_weights(logits, indices, like=weights)
        if self._recording is not None:
            self._recording.steps[-1][:, :, layer] = indices.view(*self._call_shape, self.top_k).to(torch.int16)
        return logits, weights, indices

    def _masked(self, log_probs: torch.Tensor, layer: int) -> torch.Tensor:
        if self.expert_masks is None:
            return log_probs
        modality = self._call_modality
        if modality is None:
            modality = torch.zeros(log_probs.shape[0], dtype=torch.long, device=log_probs.device)
        allowed = self.expert_masks[layer].to(log_probs.device)[modality.long()]
        return log_probs.masked_fill(~allowed, float("-inf"))

    def _replay(self, layer, adapter, logits, weights, top_k):
        recorded = self._chunk[:, :, layer].reshape(-1, self.top_k).to(device=top_k.device, dtype=top_k.dtype)
        valid = recorded[:, 0] >= 0
        # A -1 sentinel must never reach the experts' kernels: those tokens take the live top-K.
        recorded = torch.where(valid[:, None], recorded, top_k)
        if self._dispatch_recorded:
            dispatched = recorded
            weights = torch.where(valid[:, None], adapter.mixing_weights(logits, recorded, like=weights), weights)
        else:
            dispatched = top_k
        # Keyed by (row offset, layer): a checkpoint recompute during backward overwrites, never duplicates.
        self._captures[(self._chunk_start, layer)] = LayerCapture(logits, recorded, dispatched, top_k, valid)
        return logits, weights, dispatched
