"""One routing controller per model: hooks on every router module, switched by mode.

The controller installs a forward hook on each MoE router (recognized by its output contract, `recognition.py`) and
one forward pre-hook on the model itself. The hooks do nothing in `topk` mode, so a model with a controller computes
exactly what the stock model computes. The other modes replace the router's `(weights, indices)` output (through the
adapter's `unpack`/`pack`, whatever the router's output contract) before the experts run:

- `sample`: Gumbel-top-K draws from the selection distribution (optionally modality-masked), recorded as a trace;
- `noise`: Gaussian noise on the selection log-scores, then top-K (the "noise" exploration ablation), recorded too;
- `replay`: the recorded expert ids of a trace; mixing weights and logits come from the live router, so gradients
  reach it. Each replayed forward also *captures* the live logits and the routed sets for the losses.

`training_routing(mode)` routes the training forward of the fine-tuning baselines and the routing comparisons:
`topk` (stock), `sample`, `noise`, and the batch-level `expert_choice` and `sinkhorn` (see `assignment.py`). Routes
are drawn once per layer for the batch and reused whenever that layer runs again inside the context (gradient
checkpointing's recompute during backward), so backward always sees the experts the forward used.

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
from .adapters import RouterAdapter
from .assignment import expert_choice, sinkhorn_top_k
from .recognition import find_routers
from .sampling import gumbel_top_k, noisy_top_k, tempered_log_probs

RolloutRouting = Literal["topk", "sample", "noise"]
TrainingRouting = Literal["topk", "sample", "noise", "expert_choice", "sinkhorn"]
TRAINING_ROUTINGS: tuple[str, ...] = ("topk", "sample", "noise", "expert_choice", "sinkhorn")

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
class TrainingCapture(LayerCapture):
    """What one MoE layer did in a `training_routing` forward, rows in `(batch, token)` order.

    The fields of [`LayerCapture`] mean: `logits` the live router logits (with gradients in training); `recorded`
    and `dispatched` both the `[rows, slots]` expert ids the tokens were sent to; `top_k` the router's stock choice
    (`[rows, top_k]`); `valid` whether the token counts (its attention mask is 1). `slots` is `top_k` except under
    `expert_choice`, where it is the largest number of experts that chose any token of the batch in this layer.

    Attributes:
        active (`torch.Tensor`):
            `[rows, slots]` bool: the slot carries weight. `False` only under `expert_choice`, for the placeholder
            slots of tokens that fewer than `slots` experts chose (and every slot of a padding token); those slots
            have weight exactly 0.
        num_choices (`torch.Tensor`):
            `[rows]` int64: how many experts chose the token. Under `expert_choice` any number from 0 (a dropped
            token) to `num_experts`; other modes always choose `top_k`.
        logit_noise (`torch.Tensor` or `None`):
            `[rows, num_experts]` float32 under `noise` with noisy mixing weights: the noise the mixing weights'
            logits carry (the same draw that chose the experts); `None` otherwise.
    """

    active: torch.Tensor
    num_choices: torch.Tensor
    logit_noise: torch.Tensor | None = None


def stacked_slots(captures: list[TrainingCapture]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(dispatched, active)`, each `[layers, rows, slots]`: the layers' slot layouts padded to the widest.

    Expert Choice gives each layer its own width (the most experts any token got); padding slots are inactive.
    """
    width = max(c.dispatched.shape[-1] for c in captures)
    dispatched = [torch.nn.functional.pad(c.dispatched, (0, width - c.dispatched.shape[-1])) for c in captures]
    active = [torch.nn.functional.pad(c.active, (0, width - c.active.shape[-1]), value=False) for c in captures]
    return torch.stack(dispatched), torch.stack(active)


class TrainingRoutes:
    """The routes one `training_routing` context drew for its batch, and what each layer captured.

    Routes are keyed by layer: the first time a layer runs in the context it draws them, every later run of that
    layer (checkpoint recompute during backward, or a second forward on the same token ids) dispatches the same ids.
    """

    def __init__(
        self,
        mode: str,
        noise_std: float,
        capacity_factor: float,
        sinkhorn_iterations: int,
        noisy_mixing_weights: bool = True,
    ):
        self.mode = mode
        self.noise_std = noise_std
        self.noisy_mixing_weights = noisy_mixing_weights
        self.capacity_factor = capacity_factor
        self.sinkhorn_iterations = sinkhorn_iterations
        self.token_mask: torch.Tensor | None = None  # [rows] bool of the batch
        self._batch: torch.Tensor | None = None  # the token ids (or embeddings) the routes belong to
        # layer -> (indices, active, logit noise or None): what a recompute must route and weigh the same way.
        self._routes: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._captures: dict[int, TrainingCapture] = {}

    def captures(self) -> list[TrainingCapture]:
        """Per layer, what the first forward of the batch captured (checkpoint recompute does not capture again)."""
        if not self._captures:
            raise MoEGRPOError(
                "No forward ran inside `training_routing`: call the model inside the context before reading captures."
            )
        return [self._captures[layer] for layer in sorted(self._captures)]


@dataclass
class RolloutRecording:
    """Routes drawn during a generation: one entry per model call (prefill, then one per decoded token).

    Attributes:
        steps: `[batch, tokens_in_call, layers, top_k]` int16 tensors, in call order.
        selection_probs: with `capture(selection_probs=True)`, per call the `[batch, tokens_in_call, layers,
            experts]` float32 selection distribution each token's route was taken from; otherwise `None`.
    """

    steps: list[torch.Tensor]
    selection_probs: list[torch.Tensor] | None = None


def _trace_layers(routers: list) -> list[list]:
    """Routers grouped into trace layers: one router per layer, or a layer's per-modality groups together.

    ERNIE 4.5-VL's MoE blocks hold a text group (`text_moe`) and a vision group (`vision_moe`), each with its own
    router; every token goes to one of them, so the two routers share the layer's slot in the trace.
    """
    layers: list[list] = []
    for name, module, adapter in routers:
        previous = layers[-1][0] if layers else None
        if (
            previous is not None
            and adapter.modality_group == VISION
            and previous[2].modality_group == TEXT
            and name.rsplit(".", 2)[0] == previous[0].rsplit(".", 2)[0]
        ):
            first = previous[2]
            same = (type(first), first.num_experts, first.top_k, getattr(first, "describe", str)()) == (
                type(adapter),
                adapter.num_experts,
                adapter.top_k,
                getattr(adapter, "describe", str)(),
            )
            if not same:
                raise MoEGRPOError(
                    f"The text and vision expert groups at `{name.rsplit('.', 2)[0]}` route by different rules or "
                    "shapes; one trace layer needs one selection law."
                )
            layers[-1].append((name, module, adapter))
        else:
            layers.append([(name, module, adapter)])
    return layers


class RoutingController:
    """Sampled routing, trace recording and replay for the MoE routers of one model.

    Args:
        model (`nn.Module`):
            The model to control (the unwrapped `PreTrainedModel`; for PEFT models, the base model).
        vision_token_ids (`Sequence[int]`, *optional*):
            Token ids counted as vision tokens for modality masks (the processor's image/video placeholders).
    """

    def __init__(self, model: nn.Module, vision_token_ids: Sequence[int] = ()):
        layers = _trace_layers(find_routers(model))
        self.layer_names = [group[0][0] for group in layers]
        # One adapter per trace layer (its text group's where a layer has per-modality groups, whose rules agree).
        self.adapters: list[RouterAdapter] = [group[0][2] for group in layers]
        self._all_adapters = [adapter for group in layers for _, _, adapter in group]
        shapes = {(a.num_experts, a.top_k) for a in self.adapters}
        if len(shapes) != 1:
            raise MoEGRPOError(
                f"The MoE layers of `{type(model).__name__}` disagree on (num_experts, top_k): {sorted(shapes)}. "
                "Routing traces need one shape for every layer."
            )
        ((self.num_experts, self.top_k),) = shapes
        if not 1 <= self.top_k <= self.num_experts:
            # transformers' routers would fail at the first forward with torch.topk's "selected index k out of range".
            raise MoEGRPOError(
                f"The routers of `{type(model).__name__}` pick top_k={self.top_k} of num_experts={self.num_experts} "
                "experts: top_k must be between 1 and num_experts. Set the model config's `num_experts_per_tok` "
                "(top-K) to at most the number of experts."
            )
        self.num_layers = len(self.adapters)
        self.vision_token_ids = torch.tensor(sorted(set(vision_token_ids)), dtype=torch.long)

        self.mode: Literal["topk", "sample", "noise", "replay"] = "topk"
        self.noise_std = 1.0
        self.temperature = 1.0  # of `sample` rollouts: draws from softmax(log p / T)
        self.expert_masks: torch.Tensor | None = None  # [layers, 2, experts] bool: True = may be drawn
        self._recording: RolloutRecording | None = None
        self._call_shape: tuple[int, int] | None = None
        self._call_modality: torch.Tensor | None = None
        self._routes: torch.Tensor | None = None
        self._dispatch_recorded = True
        self._cursor = 0
        self._chunk: torch.Tensor | None = None
        self._chunk_start = 0
        self._captures: dict[tuple[int, ...], LayerCapture] = {}
        # For captures of a per-modality group's router: the rows it saw and the call's row count.
        self._capture_rows: dict[tuple[int, ...], tuple[torch.Tensor, int]] = {}
        self._group_mask: torch.Tensor | None = None  # [rows] bool: routed by the vision group (ERNIE 4.5-VL)
        self._training: TrainingRoutes | None = None

        self._handles = [
            module.register_forward_hook(functools.partial(self._on_router, layer, adapter))
            for layer, group in enumerate(layers)
            for _, module, adapter in group
        ]
        self._handles.append(model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._on_model_return, always_call=True))
        self._model_depth = 0  # model calls in progress: a call nested in another is the same forward

    # ------------------------------------------------------------------ public API

    def remove(self) -> None:
        """Remove every hook; the model is stock again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def router_parameters(self) -> list[nn.Parameter]:
        """The parameters of every router module (the gates MoE-GRPO trains), in layer order."""
        return [p for adapter in self._all_adapters for p in adapter.router.parameters()]

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
    def rollout(
        self, routing: RolloutRouting, noise_std: float = 1.0, temperature: float = 1.0
    ) -> Iterator[RolloutRecording]:
        """Route with `routing` and record every call's expert ids while the context is open.

        `temperature` tempers `sample` routing: K experts are drawn without replacement from `softmax(log p / T)`
        (`sampling.tempered_log_probs`), `p` the (masked) selection distribution.
        """
        if routing not in ("topk", "sample", "noise"):
            raise MoEGRPOError(f"Unknown rollout routing {routing!r}: use 'topk', 'sample' or 'noise'.")
        if not temperature > 0:
            raise MoEGRPOError(f"The routing temperature must be positive, got {temperature}.")
        self._refuse_inside_training_routing("rollout")
        previous = self.mode
        recording = RolloutRecording(steps=[])
        self.mode, self.noise_std, self._recording = routing, noise_std, recording
        self.temperature = temperature
        try:
            yield recording
        finally:
            self.mode, self._recording, self._call_shape = previous, None, None
            self.temperature = 1.0

    @contextlib.contextmanager
    def capture(self, selection_probs: bool = True) -> Iterator[RolloutRecording]:
        """Record every model call's stock top-K routes (and selection distributions) without changing the routing.

        The model computes exactly what it computes without the controller; this is `rollout("topk")` that also
        keeps each token's selection probabilities, for measuring routing (`routing_analysis`).
        """
        with self.rollout("topk") as recording:
            if selection_probs:
                recording.selection_probs = []
            yield recording

    @contextlib.contextmanager
    def step_scope(self) -> Iterator[None]:
        """Bound the lifetime of replay state: a training step's forward *and* backward (checkpoint recompute)."""
        try:
            yield
        finally:
            self.mode = "topk"
            self._routes = self._chunk = None
            self._captures.clear()
            self._capture_rows.clear()
            self._call_shape = None

    def start_replay(self, routes: torch.Tensor, dispatch: bool = True) -> None:
        """Replay `routes` (`[batch, tokens, layers, top_k]`) in the next model calls, consumed in row order.

        With `dispatch=False` the tokens go to the live top-K (no replay) but the recorded sets are still captured
        for the routing losses: the "no replay" ablation.
        """
        self.check_routes(routes)
        self._refuse_inside_training_routing("start_replay")
        self.mode, self._routes, self._dispatch_recorded = "replay", routes, dispatch
        self._cursor, self._chunk = 0, None
        self._captures.clear()
        self._capture_rows.clear()

    def finish_replay(self) -> None:
        """Check that the model calls since `start_replay` consumed every row of the trace."""
        if self._routes is not None and self._cursor != self._routes.shape[0]:
            raise MoEGRPOError(
                f"Replay consumed {self._cursor} of {self._routes.shape[0]} trace rows: the model was called on a "
                "different batch than the trace was given for."
            )

    @contextlib.contextmanager
    def training_routing(
        self,
        mode: TrainingRouting,
        noise_std: float | None = None,
        capacity_factor: float = 1.0,
        sinkhorn_iterations: int = 3,
        noisy_mixing_weights: bool = True,
    ) -> Iterator[TrainingRoutes]:
        """Route one training batch with `mode` and capture, per layer, what the routers did.

        Open it around a whole training step, forward *and* backward: with gradient checkpointing the routers run
        again during backward, and that recompute must dispatch the experts the forward drew, not a fresh draw (the
        model's pre-hook does not run in recompute, so the routes are keyed by layer for the whole context). One
        context routes one batch: calling the model on other token ids inside it is an error.

        Modes (only the router's `(logits, weights, indices)` output is replaced; the experts' compute is the
        model's own, and mixing weights always come from the live logits, so gradients reach the routers):

        - `topk`: the stock routing, untouched (outputs bit-identical to a model without the controller);
        - `sample`: `top_k` experts drawn without replacement from the selection distribution (Stoch-FT-Multi);
          mixing weights by the router family's rule;
        - `noise`: V-MoE's noisy top-K (Stoch-FT-Noise): Gaussian noise of std `noise_std` (`None`: `1 /
          num_experts`, V-MoE's choice) on the router logits, then the top-K of the noisy selection distribution.
          With `noisy_mixing_weights` (V-MoE) the router family's mixing rule is applied to the *noisy* logits (the
          noisy softmax's values), else to the noise-free ones;
        - `expert_choice`: each expert takes its top-`C` tokens of the batch, `C = ceil(capacity_factor * tokens *
          top_k / num_experts)`, and a token keeps every expert that chose it, 0 to `num_experts` of them, weighted
          by its gate probability for that expert (`exp(selection log-prob)`, not renormalized), as in Zhou et al.
          The experts receive `[rows, slots]` ids, `slots` the most experts any token of the layer got; a token's
          free slots hold valid placeholder ids of weight exactly 0, and one chosen by none passes through the
          residual only;
        - `sinkhorn`: `sinkhorn_iterations` Sinkhorn iterations balance the batch's selection probabilities to
          equal expert marginals (for softmax routers the same as balancing `exp(logits)`: per-token constants
          cancel); each token takes the top-K of the balanced scores.

        The batch-level modes (`expert_choice`, `sinkhorn`) route a token by looking at the other tokens of the
        batch, later ones included, so they are for training only: evaluate and decode with `topk`. Padding tokens
        (attention mask 0 in the model call; no mask means every token counts) take no capacity and no mass, and
        keep the stock routing (under `expert_choice`: no expert, weight 0). Expert masks (modality guidance)
        restrict `sample` and `noise` as in rollouts.

        Yields:
            [`TrainingRoutes`]: its `captures()` lists a [`TrainingCapture`] per layer once the model has run.
        """
        if mode not in TRAINING_ROUTINGS:
            raise MoEGRPOError(f"Unknown training routing {mode!r}: use one of {TRAINING_ROUTINGS}.")
        if noise_std is None:
            noise_std = 1.0 / self.num_experts  # V-MoE (Riquelme et al., 2021)
        if noise_std < 0:
            raise MoEGRPOError(f"`noise_std` must be >= 0, got {noise_std}.")
        if capacity_factor <= 0:
            raise MoEGRPOError(f"`capacity_factor` must be positive, got {capacity_factor}.")
        if sinkhorn_iterations < 0:
            raise MoEGRPOError(f"`sinkhorn_iterations` must be >= 0, got {sinkhorn_iterations}.")
        self._refuse_inside_training_routing("training_routing")
        if mode == "expert_choice":
            for name, adapter in zip(self.layer_names, self.adapters):
                if adapter.weights_from_logits:
                    raise MoEGRPOError(
                        f"`expert_choice` cannot route `{name}` (`{type(adapter.router).__name__}`): the router "
                        "returns only logits and its block takes its own top-K of them, so a token cannot get more "
                        "or fewer than top_k experts, nor a placeholder of weight 0. Use `sample`, `noise` or "
                        "`sinkhorn` for this family."
                    )
        if self.mode != "topk" or self._recording is not None:
            raise MoEGRPOError(
                f"`training_routing` was opened while the controller is in {self.mode!r} mode"
                f"{' and recording a rollout' if self._recording is not None else ''}; close that first."
            )
        routes = TrainingRoutes(mode, noise_std, capacity_factor, sinkhorn_iterations, noisy_mixing_weights)
        self._training = routes
        try:
            yield routes
        finally:
            self._training = None
            self._call_shape = self._call_modality = None

    def captures(self) -> list[LayerCapture]:
        """The captures of the last replay, per layer, rows of all calls concatenated in batch order."""
        if not self._captures:
            raise MoEGRPOError("No replayed forward was captured: call `start_replay` and run the model first.")
        starts = sorted({key[0] for key in self._captures})
        per_layer = []
        for layer in range(self.num_layers):
            parts = [self._capture_of(start, layer) for start in starts]
            per_layer.append(
                LayerCapture(*(torch.cat([getattr(p, f) for p in parts]) for f in LayerCapture.__dataclass_fields__))
            )
        return per_layer

    def _capture_of(self, start: int, layer: int) -> LayerCapture:
        """One call's capture of one layer; per-modality groups' parts put back in row order."""
        if (start, layer) in self._captures:
            return self._captures[(start, layer)]
        keys = sorted(k for k in self._captures if k[:2] == (start, layer))
        total = self._capture_rows[keys[0]][1]
        fields = {}
        for f in LayerCapture.__dataclass_fields__:
            first = getattr(self._captures[keys[0]], f)
            full = torch.zeros((total, *first.shape[1:]), dtype=first.dtype, device=first.device)
            for key in keys:  # out of place, so gradients reach each group's logits
                full = full.index_put((self._capture_rows[key][0],), getattr(self._captures[key], f))
            fields[f] = full
        return LayerCapture(**fields)

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

    def _refuse_inside_training_routing(self, what: str) -> None:
        if self._training is not None:
            raise MoEGRPOError(
                f"`{what}` was called inside `training_routing({self._training.mode!r})`: one routing at a time. "
                "Close the training routing context first."
            )

    def _on_model_return(self, module, args, output):
        self._model_depth = max(0, self._model_depth - 1)

    def _on_model_call(self, module, args, kwargs):
        self._model_depth += 1
        if self._model_depth > 1:
            # The model calling itself (TRL's fused LM head calls `model.base_model`, which is the model itself for
            # some families, e.g. Llama 4's causal LM): the outer call already set up this forward.
            return None
        if self._training is not None:
            return self._on_training_call(args, kwargs)
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
        group_mask = kwargs.get("moe_mm_token_type_ids")
        self._group_mask = group_mask.reshape(-1).bool() if isinstance(group_mask, torch.Tensor) else None

        if self._recording is not None:
            device = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).device
            self._recording.steps.append(
                torch.full((batch, length, self.num_layers, self.top_k), -1, dtype=torch.int16, device=device)
            )
            if self._recording.selection_probs is not None:
                shape = (batch, length, self.num_layers, self.num_experts)
                self._recording.selection_probs.append(torch.zeros(shape, dtype=torch.float32, device=device))
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

    def _on_training_call(self, args, kwargs):
        state = self._training
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        batch_key = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if batch_key is None:
            raise MoEGRPOError("A model call under `training_routing` passed neither `input_ids` nor `inputs_embeds`.")
        batch, length = batch_key.shape[:2]
        if state._batch is not None and (
            state._batch.shape != batch_key.shape or not torch.equal(state._batch, batch_key.detach())
        ):
            # A recompute never passes here (checkpointing re-runs layers, not the model), so this is a new batch,
            # whose routes could not be told apart from the first one's in a recompute.
            raise MoEGRPOError(
                "The model was called on a different batch inside one `training_routing` context. A context routes "
                "one batch (its forward, backward and any repeated forward on the same token ids): open a new "
                "context for each batch."
            )
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            token_mask = torch.ones(batch * length, dtype=torch.bool, device=batch_key.device)
        elif attention_mask.dim() == 2 and tuple(attention_mask.shape) == (batch, length):
            token_mask = attention_mask.reshape(-1).bool()
        else:
            raise MoEGRPOError(
                f"`training_routing` reads padding from a [batch, tokens] = [{batch}, {length}] attention mask, but "
                f"the model was called with one of shape {tuple(attention_mask.shape)}. Pass the 2-d padding mask (or "
                "none, and every token counts)."
            )
        state._batch, state.token_mask = batch_key.detach(), token_mask
        self._call_shape = (batch, length)
        self._call_modality = self.token_modality(input_ids).reshape(-1) if input_ids is not None else None
        return None

    def _on_router(self, layer: int, adapter: RouterAdapter, module: nn.Module, args, output):
        if self._training is not None:
            if adapter.modality_group is not None:
                raise MoEGRPOError(
                    "`training_routing` does not support per-modality expert groups (ERNIE 4.5-VL's text and vision "
                    "routers): the fine-tuning baselines' batch-level routings need every token in one router call."
                )
            return self._route_training(layer, output)
        if self.mode == "topk" and self._recording is None:
            return None
        logits, weights, indices = adapter.unpack(output)
        rows = self._group_rows(layer, adapter, logits.shape[0])

        if self.mode == "replay":
            return adapter.pack(output, *self._replay(layer, adapter, logits, weights, indices, rows))
        if self.mode in ("sample", "noise"):
            log_probs = self._masked(adapter.selection_log_probs(logits), layer, rows)
            if self.mode == "sample":
                indices = gumbel_top_k(tempered_log_probs(log_probs, self.temperature), self.top_k)
            else:
                indices = noisy_top_k(log_probs, self.top_k, self.noise_std)
            weights = adapter.mixing_weights(logits, indices, like=weights)
        if self._recording is not None:
            steps = self._recording.steps[-1].view(-1, self.num_layers, self.top_k)
            steps[slice(None) if rows is None else rows, layer] = indices.to(torch.int16)
            if self._recording.selection_probs is not None:
                probs = adapter.selection_log_probs(logits.detach()).exp().float()
                selection = self._recording.selection_probs[-1].view(-1, self.num_layers, self.num_experts)
                selection[slice(None) if rows is None else rows, layer] = probs
        if self.mode == "topk":
            return None  # recording only: the stock output, untouched
        return adapter.pack(output, logits, weights, indices)

    def _group_rows(self, layer: int, adapter: RouterAdapter, count: int) -> torch.Tensor | None:
        """The call's rows a router saw: `None` for every row; a per-modality group's router sees its modality's."""
        if self._call_shape is not None:
            total = self._call_shape[0] * self._call_shape[1]
            if count == total:
                return None
            if adapter.modality_group is not None and self._group_mask is not None:
                mask = self._group_mask if adapter.modality_group == VISION else ~self._group_mask
                rows = mask.nonzero().squeeze(1)
                if rows.numel() == count:
                    return rows
        raise MoEGRPOError(
            f"Router `{self.layer_names[layer]}` saw {count} tokens outside a model call the controller tracked; call "
            "the model the controller was built for, not a submodule."
        )

    def _masked(self, log_probs: torch.Tensor, layer: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        if self.expert_masks is None:
            return log_probs
        modality = self._call_modality
        if modality is not None and rows is not None:
            modality = modality[rows.to(modality.device)]
        if modality is None:
            modality = torch.zeros(log_probs.shape[0], dtype=torch.long, device=log_probs.device)
        allowed = self.expert_masks[layer].to(log_probs.device)[modality.long()]
        return log_probs.masked_fill(~allowed, float("-inf"))

    def _replay(self, layer, adapter, logits, weights, top_k, rows=None):
        recorded = self._chunk[:, :, layer].reshape(-1, self.top_k)
        if rows is not None:
            recorded = recorded[rows.to(recorded.device)]
        recorded = recorded.to(device=top_k.device, dtype=top_k.dtype)
        valid = recorded[:, 0] >= 0
        # A -1 sentinel must never reach the experts' kernels: those tokens take the live top-K.
        recorded = torch.where(valid[:, None], recorded, top_k)
        if self._dispatch_recorded:
            dispatched = recorded
            weights = torch.where(valid[:, None], adapter.mixing_weights(logits, recorded, like=weights), weights)
        else:
            dispatched = top_k
        # Keyed by (row offset, layer); the forward's capture is the one the losses read. A checkpoint recompute
        # during backward routes the same way but keeps nothing: its logits would hold the recomputed layer's graph
        # (norm and attention activations) alive until the step ends.
        key = (self._chunk_start, layer) if rows is None else (self._chunk_start, layer, adapter.modality_group)
        if key not in self._captures:
            self._captures[key] = LayerCapture(logits, recorded, dispatched, top_k, valid)
            if rows is not None:
                self._capture_rows[key] = (rows.to(logits.device), self._call_shape[0] * self._call_shape[1])
        return logits, weights, dispatched

    # ------------------------------------------------------------------ training routing

    def _route_training(self, layer: int, output):
        adapter = self.adapters[layer]  # per-modality groups are refused before this
        logits, weights, top_k = adapter.unpack(output)
        state = self._training
        rows = logits.shape[0]
        if self._call_shape is None or self._call_shape[0] * self._call_shape[1] != rows:
            raise MoEGRPOError(
                f"Router `{self.layer_names[layer]}` saw {rows} tokens outside a model call the controller tracked; "
                "call the model the controller was built for, not a submodule."
            )
        valid = state.token_mask.to(logits.device)
        drawn = state._routes.get(layer)
        if drawn is None:
            indices, active, num_choices, noise = self._draw(state, layer, adapter, logits, top_k, valid)
            state._routes[layer] = (indices, active, noise)
            state._captures[layer] = TrainingCapture(
                logits, indices, indices, top_k, valid, active, num_choices, noise
            )
        else:
            # This layer already ran for this batch: a checkpoint recompute (or a repeated forward on the same
            # ids) dispatches exactly what was drawn, with weights recomputed from the live logits.
            indices, active, noise = drawn
            if indices.shape[0] != rows:
                raise MoEGRPOError(
                    f"Router `{self.layer_names[layer]}` ran again with {rows} tokens, but routes were drawn for "
                    f"{indices.shape[0]} in this `training_routing` context."
                )
        if state.mode == "topk":
            return None  # stock output, untouched
        if state.mode == "expert_choice":
            # Zhou et al.: the token's gate probability for each expert that chose it; placeholders (and padding) 0.
            probs = adapter.selection_log_probs(logits).exp().gather(-1, indices)
            return adapter.pack(output, logits, (probs * active).to(weights.dtype), indices)
        weight_logits = logits if noise is None else logits + noise.to(logits.dtype)
        routed = adapter.mixing_weights(weight_logits, indices, like=weights)
        if adapter.weights_from_logits and noise is not None:
            # The block weighs the set by its own rule from the logits it is handed (DBRX), so the noisy mixing
            # weights reach it as the noisy logits (padding rows keep the stock ones).
            logits = torch.where(valid[:, None], weight_logits, logits)
        return adapter.pack(output, logits, torch.where(valid[:, None], routed, weights), indices)

    def _draw(self, state: TrainingRoutes, layer: int, adapter: RouterAdapter, logits, top_k, valid):
        """`(indices, active, num_choices, weight noise)` for one layer of the batch.

        Padding rows keep the stock top-K (under `expert_choice`: inactive placeholders). The noise is what the
        mixing weights add to the logits (`noise` mode with noisy mixing weights), else `None`.
        """
        rows = logits.shape[0]
        all_active = torch.ones_like(top_k, dtype=torch.bool)
        num_choices = torch.full((rows,), self.top_k, dtype=torch.long, device=logits.device)
        if state.mode == "topk":
            return top_k, all_active, num_choices, None
        noise = None
        with torch.no_grad():
            log_probs = adapter.selection_log_probs(logits.detach())
            if state.mode == "sample":
                indices = gumbel_top_k(self._masked(log_probs, layer), self.top_k)
            elif state.mode == "noise":
                # V-MoE: noise on the router logits (for softmax routers the same as on the log-scores).
                noise = state.noise_std * torch.randn(logits.shape, device=logits.device, dtype=torch.float32)
                noisy = self._masked(adapter.selection_log_probs(logits.detach().float() + noise), layer)
                indices = noisy.topk(self.top_k, dim=-1).indices
                noise = noise if state.noisy_mixing_weights else None
            elif state.mode == "sinkhorn":
                indices = sinkhorn_top_k(log_probs, self.top_k, state.sinkhorn_iterations, valid)
            else:
                choice = expert_choice(log_probs, self.top_k, state.capacity_factor, valid)
                return choice.indices.to(top_k.dtype), choice.active, choice.num_choices, None
        indices = torch.where(valid[:, None], indices.to(top_k.dtype), top_k)
        return indices, all_active, num_choices, noise
