"""Which vLLM set-ups MoE-GRPO's vLLM rollouts support, checked before any engine is built (no vLLM import here)."""

from __future__ import annotations

from typing import Any

from ..errors import MoEGRPOError

VLM_ERROR = (
    "MoE-GRPO's vLLM rollouts support text-only MoE models: the router hook inside vLLM cannot tell image tokens "
    "from text tokens, so the modality masks of router guidance cannot be applied, and the pinned vLLM test "
    "environment cannot load vision models. Use `use_vllm=False` (transformers generation) for vision-language models."
)


def check_vllm_generation_options(mode: str, tensor_parallel_size: int, enable_sleep_mode: bool) -> None:
    """Raise `MoEGRPOError` for vLLM settings whose rollouts could not be routed and recorded."""
    if mode != "colocate":
        raise MoEGRPOError(
            f"`vllm_mode={mode!r}` is not supported by MoEGRPOTrainer: the vLLM server runs in its own process, where "
            "the router hooks that sample and record the experts are not installed, and TRL's server API returns no "
            "routes (docs/vllm.md, 'Server mode'). Use `vllm_mode='colocate'`."
        )
    if tensor_parallel_size != 1:
        raise MoEGRPOError(
            f"`vllm_tensor_parallel_size={tensor_parallel_size}` is not supported with MoE-GRPO's vLLM routing: each "
            "tensor-parallel rank would draw its own routes for the same tokens. Use `vllm_tensor_parallel_size=1`."
        )
    if enable_sleep_mode:
        raise MoEGRPOError(
            "`vllm_enable_sleep_mode=True` is not supported with MoE-GRPO's vLLM routing (its CPU weight sync reloads "
            "the weights in place, which sleep mode discards). Set `vllm_enable_sleep_mode=False`."
        )


def refuse_vision_language_model(model: Any) -> None:
    """Raise `MoEGRPOError` if `model` (a model, or its name or path) is a vision-language model."""
    if isinstance(model, str):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    else:
        config = getattr(model, "config", None)
    if getattr(config, "vision_config", None) is not None:
        raise MoEGRPOError(f"`{type(config).__name__}` is a vision-language model. {VLM_ERROR}")
