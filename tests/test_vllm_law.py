"""vLLM rollouts follow each family's law, or `use_vllm=True` refuses the family (no vLLM needed for this check).

vLLM's routing function (`vllm_routing.router_hooks`) draws from `softmax(router logits)` and mixes by their softmax.
For every MoE family of the installed transformers that the controller accepts, either the family's adapter has
exactly that selection law and mixing rule (checked numerically against the routing function itself), or
`check_vllm_routing_law` refuses it with an error naming the router and its rule.
"""

from __future__ import annotations

import pytest
import torch

from trl_moe_grpo import MoEGRPOError
from trl_moe_grpo.routing import find_routers
from trl_moe_grpo.routing.adapters import TopKSoftmaxAdapter
from trl_moe_grpo.testing.families import build_tiny_family, moe_model_types
from trl_moe_grpo.vllm_routing.router_hooks import check_vllm_routing_law, follows_vllm_law, make_routing_function

FAMILIES = moe_model_types()


def accepted(model_type: str):
    try:
        model = build_tiny_family(model_type)
        return model, find_routers(model)
    except Exception:
        return None, None


@pytest.mark.parametrize("model_type", FAMILIES)
def test_vllm_follows_the_family_law_or_refuses(model_type):
    model, routers = accepted(model_type)
    if routers is None:
        pytest.skip(f"{model_type}: not accepted by the controller (see test_families.py)")
    logits = torch.randn(32, routers[0][2].num_experts, generator=torch.Generator().manual_seed(0)) * 2
    if all(follows_vllm_law(adapter) for _, _, adapter in routers):
        check_vllm_routing_law(model)
        for _, _, adapter in routers:
            torch.testing.assert_close(adapter.selection_log_probs(logits), torch.log_softmax(logits, -1))
            route = make_routing_function("topk")
            # Top-K then softmax is softmax renormalized over the set (vLLM's `renormalize=True` for GPT-OSS).
            renormalize = adapter.renormalize or isinstance(adapter, TopKSoftmaxAdapter)
            weights, ids = route(None, logits, adapter.top_k, renormalize)
            expected = adapter.mixing_weights(logits, ids.long(), like=weights)
            torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
    else:
        with pytest.raises(MoEGRPOError, match="use_vllm=False") as error:
            check_vllm_routing_law(model)
        assert any(type(router).__name__ in str(error.value) for _, router, _ in routers)


def test_sigmoid_families_are_refused():
    """DeepSeek-V3's normalized sigmoid affinities are not vLLM's softmax: refused, naming the rule."""
    model = build_tiny_family("deepseek_v3")
    with pytest.raises(MoEGRPOError, match="sigmoid"):
        check_vllm_routing_law(model)
