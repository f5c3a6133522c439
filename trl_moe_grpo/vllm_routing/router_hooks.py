"""The routing function installed on vLLM's CPU routers: the HF path's selection laws, evaluated inside vLLM.

vLLM's CPU MoE layers (`MoERunner` with a `CPURouter`) call `router.custom_routing_function(hidden_states,
gating_output, topk, renormalize)` in place of their top-K and expect `(weights, ids)`. The function built here draws
the experts exactly as `trl_moe_grpo.routing.controller` does for the HF model (the same `gumbel_top_k` / `noisy_top_k`
on `log_softmax(router logits)`, the softmax-then-top-K families' selection distribution), and gives them the mixing
weights the router's own rule gives a chosen set (`SoftmaxTopKAdapter.mixing_weights`: `softmax(z)[S]`, renormalized
when vLLM says so, which it does from the model config's `norm_topk_prob`, always for Mixtral).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import MoEGRPOError
from ..routing.adapters import RouterAdapter, SoftmaxTopKAdapter, TopKSoftmaxAdapter
from ..routing.recognition import find_routers
from ..routing.sampling import gumbel_top_k, noisy_top_k

SUPPORTED_MODES = ("sample", "noise", "topk")

RoutingFunction = Callable[[torch.Tensor, torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]


def follows_vllm_law(adapter: RouterAdapter) -> bool:
    """Whether the HF router's selection law and mixing rule are the ones `make_routing_function` applies in vLLM.

    vLLM's routing function draws from `softmax(z)` and mixes by `softmax(z)[S]`, renormalized when vLLM says so:
    a softmax router, or a top-K-then-softmax one (`softmax(z[S])` is `softmax(z)[S]` renormalized), with no
    constant or per-expert scale and the stock output contract.
    """
    plain = type(adapter) in (SoftmaxTopKAdapter, TopKSoftmaxAdapter)
    return plain and adapter.scale == 1.0 and adapter.expert_scale is None and adapter.computed_experts is None


def check_vllm_routing_law(model: torch.nn.Module) -> None:
    """Refuse vLLM rollouts for a model whose routers follow another law than vLLM's routing function.

    Otherwise rollouts would be drawn under one selection distribution (vLLM's softmax) and scored under another
    (the adapter's, e.g. DeepSeek-V3's normalized sigmoid affinities), and the mixing weights would differ too.

    Raises:
        MoEGRPOError: naming the family, the router class and its rule.
    """
    for name, router, adapter in find_routers(model):
        if not follows_vllm_law(adapter):
            rule = adapter.describe() if hasattr(adapter, "describe") else adapter.rule
            raise MoEGRPOError(
                f"`use_vllm=True` cannot roll out `{type(model).__name__}`: its router `{name}` "
                f"(`{type(router).__name__}`) selects and mixes experts by {rule}, while vLLM's routing function "
                "draws from softmax(router logits) and mixes by their softmax: rollouts would be sampled under one "
                "law and scored under another. Use transformers generation (`use_vllm=False`) for this family."
            )


def make_routing_function(
    mode: str,
    noise_std: float = 1.0,
    expert_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> RoutingFunction:
    """Build the `custom_routing_function` for one layer.

    Args:
        mode (`str`):
            `sample` (Gumbel-top-K from the selection distribution), `noise` (top-K of Gaussian-perturbed selection
            log-probabilities) or `topk` (the stock choice, recorded for routing replay).
        noise_std (`float`):
            Standard deviation for `noise`.
        expert_mask (`torch.Tensor`, *optional*):
            `[experts]` bool, experts allowed for this layer (a text-token modality mask); `None` allows all.
        generator (`torch.Generator`, *optional*):
            Randomness source; the global CPU generator when `None` (vLLM seeds it from `seed`).

    Returns:
        A function `(hidden_states, gating_output, topk, renormalize) -> (weights, ids)`, float32 and int32
        `[rows, k]`.
    """
    if mode not in SUPPORTED_MODES:
        raise ValueError(f"rollout routing {mode!r} is not one of {SUPPORTED_MODES}.")

    def route(
        hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        del hidden_states  # the softmax routers' law depends on the logits only
        logits = gating_output.float()
        # The selection log-probabilities are `log_softmax(z + m) = z + m - c` per row: the three draws below are
        # invariant to the row constant `c`, so they run on `z + m` and skip a log-softmax per router call (the
        # same draws, for the same noise, as on the HF path's log-probabilities).
        masked = logits if expert_mask is None else logits.masked_fill(~expert_mask, float("-inf"))
        if mode == "sample":
            ids = gumbel_top_k(masked, topk, generator=generator)
        elif mode == "noise":
            ids = noisy_top_k(masked, topk, noise_std, generator=generator)
        else:
            ids = torch.topk(masked, topk, dim=-1, sorted=True).indices
        weights = torch.softmax(logits, dim=-1).gather(-1, ids)  # softmax(z)[S]: the unmasked router's weights
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids.to(torch.int32)

    return route
