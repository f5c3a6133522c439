"""Per-family gating math of Hugging Face router modules.

transformers 5 gives every MoE block a small router module that returns `(router_logits, weights, indices)`. The
families differ in how logits become a *selection distribution* (what the sampler draws from and what Gate-GRPO
scores) and *mixing weights* (how the chosen experts' outputs are combined). An adapter wraps one router module and
knows both rules for its family; everything else, the experts' compute included, stays transformers' own.

Adapters are looked up by the router's class name in `ROUTER_ADAPTERS`; an unknown class is an error that lists the
supported ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MoEGRPOError


class RouterAdapter:
    """Gating math for one router module.

    Args:
        router (`nn.Module`):
            The transformers router module (e.g. `Qwen3MoeTopKRouter`). Its `top_k` and `num_experts` attributes are
            read once here.
    """

    def __init__(self, router: nn.Module):
        self.router = router
        self.top_k = int(router.top_k)
        self.num_experts = int(router.num_experts)

    def selection_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log of the selection distribution `p` over experts, float32, shape `[rows, num_experts]`."""
        raise NotImplementedError

    def mixing_weights(self, logits: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Weights the router's own rule gives to the experts `indices` (`[rows, top_k]`), from the live logits.

        `like` is the router's stock weight tensor: the result has its dtype, so the experts see what they always see.
        """
        raise NotImplementedError


class SoftmaxTopKAdapter(RouterAdapter):
    """Softmax, then top-K (Qwen2-MoE, Qwen3-MoE, Qwen3-VL-MoE, OLMoE, Mixtral, CLIP-MoE).

    Selection distribution: `softmax(z)`. Mixing weights: `softmax(z)[S]`, renormalized over `S` when the router's
    `norm_topk_prob` is set (Mixtral always renormalizes).
    """

    def __init__(self, router: nn.Module):
        super().__init__(router)
        self.renormalize = bool(getattr(router, "norm_topk_prob", True))

    def selection_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1)

    def mixing_weights(self, logits: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(logits.float(), dim=-1).gather(-1, indices)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(like.dtype)


class TopKSoftmaxAdapter(RouterAdapter):
    """Top-K, then softmax over the chosen logits (GPT-OSS).

    Selection distribution: `softmax(z)` over all experts (its top-K is the stock choice). Mixing weights:
    `softmax(z[S])`, which is what the router computes for its own top-K.
    """

    def selection_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1)

    def mixing_weights(self, logits: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.gather(-1, indices), dim=-1, dtype=like.dtype)


class SigmoidGroupedAdapter(RouterAdapter):
    """Sigmoid scores with bias correction, group-limited top-K and scaling (DeepSeek-V3).

    Selection distribution: the sigmoid affinities normalized over all experts, `p = sigmoid(z) / sum sigmoid(z)`.
    The bias correction (`e_score_correction_bias`) and the group limit are deterministic load-balancing devices of
    the stock top-K rule, not probabilities: the sampled policy leaves them out, so every expert can be drawn and the
    probability of any recorded set stays finite after the router moves. `topk` mode keeps the stock rule untouched.
    Mixing weights: `sigmoid(z)[S]`, renormalized when `norm_topk_prob` is set, times `routed_scaling_factor`, as the
    router does for its own choice.
    """

    def __init__(self, router: nn.Module):
        super().__init__(router)
        self.renormalize = bool(router.norm_topk_prob)
        self.scaling = float(router.routed_scaling_factor)

    def selection_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        log_scores = F.logsigmoid(logits.float())
        return log_scores - torch.logsumexp(log_scores, dim=-1, keepdim=True)

    def mixing_weights(self, logits: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        weights = logits.float().sigmoid().gather(-1, indices)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scaling).to(like.dtype)


# Router class name -> adapter. Each entry has a parity test in tests/test_adapters.py.
ROUTER_ADAPTERS: dict[str, type[RouterAdapter]] = {
    "Qwen2MoeTopKRouter": SoftmaxTopKAdapter,
    "Qwen3MoeTopKRouter": SoftmaxTopKAdapter,
    "Qwen3VLMoeTextTopKRouter": SoftmaxTopKAdapter,
    "OlmoeTopKRouter": SoftmaxTopKAdapter,
    "MixtralTopKRouter": SoftmaxTopKAdapter,
    "CLIPMoeTopKRouter": SoftmaxTopKAdapter,  # trl_moe_grpo.clip_moe's vision encoder
    "GptOssTopKRouter": TopKSoftmaxAdapter,
    "DeepseekV3TopkRouter": SigmoidGroupedAdapter,
}


def _looks_like_router(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("Router") and hasattr(module, "top_k") and hasattr(module, "weight")


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module, RouterAdapter]]:
    """The MoE routers of `model` in forward order, each with its adapter.

    Raises:
        MoEGRPOError: when `model` has no router (a dense model) or a router class with no adapter.
    """
    routers = []
    for name, module in model.named_modules():
        if not _looks_like_router(module):
            continue
        adapter_cls = ROUTER_ADAPTERS.get(type(module).__name__)
        if adapter_cls is None:
            raise MoEGRPOError(
                f"Router module `{name}` is a `{type(module).__name__}`, which trl-moe-grpo has no adapter for. "
                f"Supported router classes: {', '.join(sorted(ROUTER_ADAPTERS))}. To add one, subclass "
                "`trl_moe_grpo.routing.RouterAdapter` and register it in `ROUTER_ADAPTERS` under the class name."
            )
        routers.append((name, module, adapter_cls(module)))
    if not routers:
        raise MoEGRPOError(
            f"`{type(model).__name__}` has no Mixture-of-Experts router, so there is no routing to sample or train: "
            "MoE-GRPO needs an MoE model. Convert a dense model first (e.g. `trl-moe-grpo upcycle`), or train a dense "
            "model with `trl.GRPOTrainer`. Supported router classes: " + ", ".join(sorted(ROUTER_ADAPTERS)) + "."
        )
    return routers
