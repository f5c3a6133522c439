"""`ReplayState`: the rollout trace's hand-off between the TRL methods `MoEGRPOTrainer` overrides; `ActiveRouting`:
which routing is active now.

TRL's signatures leave no argument through which a routing trace could travel from generation to the forwards that
replay it, so the trainer keeps it here, with what those forwards hand back. One object, one owner (the trainer), and
a lifetime in two phases (`docs/design.md` §4, "The rollout trace, from generation to the loss"):

1. Generation and scoring (`_generate_and_score_completions`), once per generation batch:
   `begin_generation()` -> `set_trace(trace)` (`_generate_single_turn`, from the rollouts' recorded routes) -> each
   forward TRL runs replays `trace_to_replay()`; the policy's forward there is TRL's old-log-prob pass
   (`scoring_rollouts`), which leaves `keep_old_gate_logps(...)` -> `end_generation()` hands the trace to the batch
   dict (`routed_experts`) and `take_old_gate_logps()` the old gate log-probs (`old_gate_logps`).
2. Each training (or evaluation) step on a micro-batch of it (`_compute_loss`): `begin_loss(routes)` with the
   micro-batch's `routed_experts` -> TRL's policy forward replays it and leaves `keep_policy_captures(...)` ->
   `take_policy_captures()` for Gate-GRPO and the balance loss.

`end_step()` (when `_routing_step` exits, after backward) forgets everything, so nothing leaks into the next step.
What a forward hands back is stored by role, never by call order, and each result is taken once by its one reader.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MoEGRPOError
from ..routing.controller import LayerCapture, RolloutRouting
from .grpo_config import MoEGRPOConfig


@dataclass(frozen=True)
class ActiveRouting:
    """Which routing is active now: how the rollouts about to run route and decode, and what replaying them does.

    The rule, in this one place: training rollouts route with the config's `rollout_routing`; evaluation routes as
    inference does, with the routers' stock top-K, and decodes greedily under `greedy_eval`; every forward that scores
    rollouts (old log-probs, reference, policy) replays their trace ([`ReplayState`]).

    Attributes:
        rollout (`str`):
            The rollouts' routing: `"sample"`, `"noise"` or `"topk"`.
        noise_std (`float`):
            The noise of `"noise"` routing.
        temperature (`float`):
            The temperature of `"sample"` routing's law (`rollout_routing_temperature` in training; evaluation routes
            top-K, untempered).
        greedy (`bool`):
            Whether the rollouts decode their tokens greedily.
        dispatch_recorded (`bool`):
            Whether a replayed forward sends each token to its recorded experts (`routing_replay`), or to the live
            top-K while still capturing the recorded sets for the routing losses (the no-replay ablation).
    """

    rollout: RolloutRouting
    noise_std: float
    temperature: float
    greedy: bool
    dispatch_recorded: bool

    @classmethod
    def now(cls, args: MoEGRPOConfig, training: bool) -> ActiveRouting:
        """The routing of a training step (`training`, the model's training mode) or of an evaluation one."""
        return cls(
            rollout=args.rollout_routing if training else "topk",
            noise_std=args.routing_noise_std,
            temperature=args.rollout_routing_temperature if training else 1.0,
            greedy=args.greedy_decoding or (not training and args.greedy_eval),
            dispatch_recorded=args.routing_replay,
        )

    @property
    def draws_routes(self) -> bool:
        """Whether the rollouts draw their expert sets (`"sample"`, `"noise"`), under the expert masks of modality
        guidance when it is on; top-K rollouts take the router's stock choice, which no mask shapes."""
        return self.rollout != "topk"


class ReplayState:
    """The trace the next forward replays, and what the replayed forwards of one batch hand back.

    Attributes:
        trace (`torch.Tensor` or `None`):
            `[batch, tokens, layers, top_k]` int16, the routing trace every forward replays until it is replaced
            (`routing/traces.py` layout); `None` between steps.
        scoring_rollouts (`bool`):
            `True` between `begin_generation()` and `end_generation()`: a policy forward then is TRL's no-grad
            old-log-prob pass, so its captures score the old gate log-probs instead of feeding the loss.
    """

    def __init__(self) -> None:
        self.trace: torch.Tensor | None = None
        self.scoring_rollouts = False
        self._old_gate_logps: torch.Tensor | None = None
        self._policy_captures: list[LayerCapture] | None = None

    # ------------------------------------------------------------------ phase 1: generation and scoring

    def begin_generation(self) -> None:
        """A generation batch starts: no trace yet (the rollouts make it), and policy forwards score rollouts."""
        self.trace = None
        self._old_gate_logps = None
        self.scoring_rollouts = True

    def set_trace(self, trace: torch.Tensor) -> None:
        """The trace the next forwards replay: the rollouts' recorded routes, laid out like TRL's token ids."""
        self.trace = trace

    def keep_old_gate_logps(self, old_gate_logps: torch.Tensor) -> None:
        """What TRL's old-log-prob pass scored: `[batch, tokens, layers]` log-probs of the recorded sets, detached."""
        self._old_gate_logps = old_gate_logps

    def end_generation(self) -> torch.Tensor | None:
        """Scoring is over: the trace leaves the state (it travels on in the batch dict, as `routed_experts`)."""
        self.scoring_rollouts = False
        trace, self.trace = self.trace, None
        return trace

    def take_old_gate_logps(self) -> torch.Tensor | None:
        """The old gate log-probs, once; `None` when TRL ran no old-log-prob pass (generations are not reused)."""
        old_gate_logps, self._old_gate_logps = self._old_gate_logps, None
        return old_gate_logps

    # ------------------------------------------------------------------ every replayed forward

    def trace_to_replay(self) -> torch.Tensor:
        """The trace for the forward about to run; a forward without one is a broken hand-off."""
        if self.trace is None:
            raise MoEGRPOError("A training forward ran without a routing trace to replay.")
        return self.trace

    # ------------------------------------------------------------------ phase 2: the loss of one micro-batch

    def begin_loss(self, routes: torch.Tensor) -> None:
        """The loss of a micro-batch starts: its `routed_experts` is the trace the training forward replays."""
        self.trace = routes
        self._policy_captures = None

    def keep_policy_captures(self, captures: list[LayerCapture]) -> None:
        """What the training forward captured, per MoE layer (live logits with gradients, routed sets)."""
        self._policy_captures = captures

    def take_policy_captures(self) -> list[LayerCapture]:
        """The training forward's captures, once; an error if TRL's loss ran no policy forward."""
        captures, self._policy_captures = self._policy_captures, None
        if captures is None:
            raise MoEGRPOError("TRL's loss ran no policy forward through `_get_per_token_logps_and_entropies`.")
        return captures

    # ------------------------------------------------------------------ end of a step

    def end_step(self) -> None:
        """A training or evaluation step is over, backward (checkpoint recompute) included: forget everything."""
        self.trace = None
        self.scoring_rollouts = False
        self._old_gate_logps = None
        self._policy_captures = None
