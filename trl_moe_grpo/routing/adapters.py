"""Per-family gating math of Hugging Face router modules: one adapter per scoring rule and output contract.

transformers 5 gives most MoE blocks a small router module. The families differ in what the router returns (its
*output contract*) and in how logits become a *selection distribution* (what the sampler draws from and what Gate-GRPO
scores) and *mixing weights* (how the chosen experts' outputs are combined). An adapter wraps one router module and
knows both for its router; everything else, the experts' compute included, stays transformers' own.

The scoring rules (`SCORING_RULES`): softmax, sigmoid, top-K-then-softmax, logits that already are probabilities,
sqrt-softplus, and PhiMoE's sparsemixer, each with or without renormalization over the chosen set, with a constant
and a per-expert scale. The contracts: `(logits, weights, indices, ...)` (most families), Llama 4's
`(dense_scores, logits)` (`DenseScoresContract`) and logits only, the block choosing (`LogitsOnlyContract`, DBRX).
Which adapter a router gets is decided by `routing/recognition.py`; `ROUTER_ADAPTERS` lists the class-name overrides.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class RouterAdapter:
    """Gating math and output contract for one router module.

    Args:
        router (`nn.Module`):
            The transformers router module (e.g. `Qwen3MoeTopKRouter`).
        top_k (`int`, *optional*):
            Experts per token; the router's `top_k` attribute when not given.
        num_experts (`int`, *optional*):
            Number of experts; the router's `num_experts` attribute when not given.
    """

    rule = "custom"  # a short name of the scoring rule, for error messages and the supported-families table
    # Per-modality expert groups (ERNIE 4.5-VL): 0 for the text group's router, 1 for the vision group's; such a
    # router sees only its modality's tokens. None for a router that sees every token.
    modality_group: int | None = None
    # Set when the router scores more experts than the block computes and maps the extra (skip) experts itself to
    # expert 0 with weight 0: sampled and replayed sets must be mapped the same way before the experts see them.
    computed_experts: int | None = None
    # Set when the block weighs the chosen set by its own rule from the logits `pack` hands it, ignoring `weights`
    # (logits-only routers, DBRX): other weights than the rule's reach it only as other logits.
    weights_from_logits: bool = False

    def __init__(self, router: nn.Module, top_k: int | None = None, num_experts: int | None = None):
        self.router = router
        self.top_k = int(top_k if top_k is not None else router.top_k)
        self.num_experts = int(num_experts if num_experts is not None else router.num_experts)

    def selection_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log of the selection distribution `p` over experts, float32, shape `[rows, num_experts]`."""
        raise NotImplementedError

    def mixing_weights(self, logits: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Weights the router's own rule gives to the experts `indices` (`[rows, top_k]`), from the live logits.

        `like` is the router's stock weight tensor: the result has its dtype, so the experts see what they always see.
        """
        raise NotImplementedError

    # The output contract: most routers return `(logits, weights, indices, *extra)`.

    def unpack(self, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(logits, weights, indices)` of one stock router output."""
        return output[0], output[1], output[2]

    def pack(self, output, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
        """The router output with `weights` and `indices` in place of the stock ones (extra outputs kept)."""
        if self.computed_experts is not None:
            # A skip expert the router itself hands to the experts as expert 0 with weight 0 (ZAYA).
            skip = indices >= self.computed_experts
            weights, indices = weights.masked_fill(skip, 0), indices.masked_fill(skip, 0)
        return (logits, weights, indices, *output[3:])


def _scaled(adapter: ScoredTopKAdapter, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    if adapter.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + adapter.epsilon)
    if adapter.expert_scale is not None:
        factors = adapter.expert_scale_values
        if factors is None:
            factors = getattr(adapter.router, adapter.expert_scale)
        weights = weights * factors.float()[indices]
    return weights * adapter.scale if adapter.scale != 1.0 else weights


class ScoredTopKAdapter(RouterAdapter):
    """A router that scores experts elementwise (or by a softmax), takes K, and mixes by the chosen scores.

    Mixing weights: `score(z)[S]`, renormalized over `S` when `renormalize`, times the router's per-expert scale
    (`expert_scale` names the attribute, read live: it trains) and times `scale`. Selection distribution: the scores
    normalized over all experts. Bias corrections and group limits of the stock top-K are deterministic load-balancing
    devices, not probabilities: the sampled policy leaves them out, so every expert can be drawn and the probability
    of any recorded set stays finite as the router moves; `topk` mode keeps the stock rule untouched.

    Args:
        router (`nn.Module`): the router module.
        renormalize (`bool`): renormalize the chosen scores over the set.
        scale (`float`): constant factor on the weights (`routed_scaling_factor`).
        expert_scale (`str`, *optional*): attribute of the router holding a per-expert factor on the weights.
        top_k, num_experts: see [`RouterAdapter`].
    """

    rule = "scored"
    epsilon = 0.0
    # The per-expert factors recognition probed with, in place of the router's own while it checks a rule.
    expert_scale_values: torch.Tensor | None = None

    def __init__(
        self,
        router: nn.Module,
        renormalize: bool = True,
        scale: float = 1.0,
        expert_scale: str | None = None,
        top_k: int | None = None,
        num_experts: int | None = None,
    ):
        super().__init__(router, top_k, num_experts)
        self.renormalize = renormalize
        self.scale = float(scale)
        self.expert_scale = expert_scale

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-expert scores (nonnegative), float32."""
        raise NotImplementedError

    def selection_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        log_scores = self.scores(logits).clamp_min(torch.finfo(torch.float32).tiny).log()
        return log_scores - torch.logsumexp(log_scores, dim=-1, keepdim=True)

    def mixing_weights(self, logits: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _scaled(self, self.scores(logits).gather(-1, indices), indices).to(like.dtype)

    def describe(self) -> str:
        parts = [self.rule, "renormalized" if self.renormalize else "not renormalized"]
        if self.scale != 1.0:
            parts.append(f"x{self.scale:g}")
        if self.expert_scale:
            parts.append(f"x {self.expert_scale}")
        return ", ".join(parts)


class SoftmaxTopKAdapter(ScoredTopKAdapter):
    """Softmax, then top-K (Qwen2/3-MoE, Qwen3-VL-MoE, Qwen3.5-MoE, Qwen3-Next, OLMoE, Mixtral, ERNIE 4.5, CLIP-MoE).

    Selection distribution: `softmax(z)`. Mixing weights: `softmax(z)[S]`, renormalized over `S` when the router's
    `norm_topk_prob` is set (Mixtral always renormalizes).
    """

    rule = "softmax"

    def __init__(self, router: nn.Module, renormalize: bool | None = None, **kwargs):
        if renormalize is None:
            renormalize = bool(getattr(router, "norm_topk_prob", True))
        super().__init__(router, renormalize=renormalize, **kwargs)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def selection_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1)


class TopKSoftmaxAdapter(ScoredTopKAdapter):
    """Top-K of the logits, then softmax over the chosen ones (GPT-OSS, Cohere2-MoE).

    Selection distribution: `softmax(z)` over all experts (its top-K is the stock choice). Mixing weights:
    `softmax(z[S])`, which is what the router computes for its own top-K.
    """

    rule = "top-K then softmax"

    def __init__(self, router: nn.Module, **kwargs):
        kwargs.setdefault("renormalize", False)
        super().__init__(router, **kwargs)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def selection_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1)

    def mixing_weights(self, logits: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not self.renormalize and self.scale == 1.0 and self.expert_scale is None:
            return torch.softmax(logits.gather(-1, indices), dim=-1, dtype=like.dtype)
        return _scaled(self, torch.softmax(logits.float().gather(-1, indices), dim=-1), indices).to(like.dtype)


class SigmoidGroupedAdapter(ScoredTopKAdapter):
    """Sigmoid scores, with or without bias correction and group limits (DeepSeek-V3, GLM-4.5/4.5V, Kimi-Linear, ...).

    Selection distribution: the sigmoid affinities normalized over all experts, `p = sigmoid(z) / sum sigmoid(z)`.
    Mixing weights: `sigmoid(z)[S]`, renormalized when `norm_topk_prob` is set, times `routed_scaling_factor`, as the
    router does for its own choice.
    """

    rule = "sigmoid"
    epsilon = 1e-20

    def __init__(self, router: nn.Module, renormalize: bool | None = None, scale: float | None = None, **kwargs):
        if renormalize is None:
            renormalize = bool(router.norm_topk_prob)
        if scale is None:
            scale = float(router.routed_scaling_factor)
        super().__init__(router, renormalize=renormalize, scale=scale, **kwargs)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    def selection_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        log_scores = F.logsigmoid(logits.float())
        return log_scores - torch.logsumexp(log_scores, dim=-1, keepdim=True)


class SqrtSoftplusAdapter(ScoredTopKAdapter):
    """`sqrt(softplus(z))` scores (DeepSeek-V4's `sqrtsoftplus` scoring function), normalized like sigmoid scores."""

    rule = "sqrt-softplus"
    epsilon = 1e-20

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return F.softplus(logits.float()).sqrt()


class ProbabilityAdapter(ScoredTopKAdapter):
    """Routers whose first output already is the softmax distribution (Gemma 4): scores are that output."""

    rule = "probabilities"

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float()


class SparseMixerAdapter(RouterAdapter):
    """PhiMoE's sparsemixer: each chosen expert's weight is a softmax over the experts close to it.

    For the j-th expert `s_j` of a set in drawn order, the experts drawn before it are removed and those whose logit
    is more than a relative `2 * router_jitter_noise` below `z[s_j]` are masked; its weight is the softmax of what
    remains at `s_j`. For the stock choice (the argmax, then the argmax of the rest) this is exactly the router's
    eval-mode weight; in training mode the stock router samples its own experts and uses a Heun-method gradient
    estimator, which replay replaces by the plain softmax gradient of these weights. Selection distribution:
    `softmax(z)`.
    """

    rule = "sparsemixer"

    def __init__(self, router: nn.Module, top_k: int | None = None, num_experts: int | None = None):
        super().__init__(router, top_k, num_experts)
        self.jitter = float(router.router_jitter_noise)

    def selection_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1)

    def mixing_weights(self, logits: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        removed = torch.zeros_like(scores, dtype=torch.bool)
        weights = []
        for j in range(indices.shape[-1]):
            chosen = indices[:, j : j + 1]
            remaining = scores.masked_fill(removed, float("-inf"))
            with torch.no_grad():
                threshold = remaining.gather(-1, chosen)
                factor = remaining.abs().clamp(min=threshold)
                far = ((threshold - remaining) / factor) > (2 * self.jitter)
            weights.append(torch.softmax(remaining.masked_fill(far, float("-inf")), dim=-1).gather(-1, chosen))
            removed = removed.scatter(-1, chosen, True)
        return torch.cat(weights, dim=-1).to(like.dtype)

    def describe(self) -> str:
        return f"sparsemixer (eps {self.jitter:g})"


class DenseScoresContract:
    """Llama 4's output contract: `(scores, logits)`, scores `[rows, experts]` holding the chosen experts' weights
    and exact zeros elsewhere (the block weights every expert's input by its score)."""

    def unpack(self, output):
        scores, logits = output
        indices = torch.topk(logits, self.top_k, dim=-1).indices
        return logits, scores.gather(-1, indices), indices

    def pack(self, output, logits, weights, indices):
        scores = torch.zeros_like(output[0]).scatter(-1, indices, weights.to(output[0].dtype))
        return scores, logits


class DenseSigmoidAdapter(DenseScoresContract, SigmoidGroupedAdapter):
    """Llama 4: top-K of the logits, each chosen expert weighted by `sigmoid(z)`, not renormalized, as dense scores."""

    rule = "sigmoid (dense scores)"

    def __init__(self, router: nn.Module, **kwargs):
        kwargs.setdefault("renormalize", False)
        kwargs.setdefault("scale", 1.0)
        super().__init__(router, **kwargs)


class LogitsOnlyContract:
    """Routers that return only logits, the block choosing the experts with `route_tokens_to_experts` (DBRX).

    The chosen set reaches the experts by the router's output alone: every expert outside it gets logit `-inf`, so
    the block's own top-K picks exactly the set and its own rule weights it. Recognition checks that this gives the
    weights the adapter's rule gives the set (true of renormalized rules, whose weights depend only on the set's
    logits); the experts' compute stays the block's.
    """

    route: Callable  # the block's `route_tokens_to_experts`
    weights_from_logits = True

    def unpack(self, output):
        weights, indices = self.route(output)
        return output, weights, indices

    def pack(self, output, logits, weights, indices):
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, indices, True)
        return logits.masked_fill(~keep, float("-inf"))


# The rules recognition tries, in order. The first whose weights match the router's own wins; rules that agree on a
# router (e.g. every renormalized rule when K = 1) agree on its weights, so the order decides only the selection law.
SCORING_RULES: tuple[type[ScoredTopKAdapter], ...] = (
    SoftmaxTopKAdapter,
    SigmoidGroupedAdapter,
    TopKSoftmaxAdapter,
    ProbabilityAdapter,
    SqrtSoftplusAdapter,
)

# Router class name -> adapter: overrides of recognition, each with a parity test in tests/test_adapters.py.
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
