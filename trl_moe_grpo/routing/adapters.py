"""Per-family gating math of Hugging Face router modules, recognized by what the router does.

transformers 5 gives most MoE blocks a small router module. The families differ in what the router returns (its
*output contract*) and in how logits become a *selection distribution* (what the sampler draws from and what Gate-GRPO
scores) and *mixing weights* (how the chosen experts' outputs are combined). An adapter wraps one router module and
knows both for its router; everything else, the experts' compute included, stays transformers' own.

Routers are found by structure and recognized by contract (`docs/design.md` §4), not by class name:

1. A router is a child of an MoE block (a module with an `experts` child) whose name or class says router or gate
   (shared-expert gates excepted), or any module whose class name ends in `Router` and that has `top_k`.
2. Its output contract is read from one call on random hidden states and random parameters (never the model's own):
   `(logits, weights, indices, ...)` with `[rows, experts]`, `[rows, k]`, `[rows, k]` integer tensors (most
   families), or Llama 4's `(dense_scores, logits)`.
3. Its scoring rule is the first rule of `SCORING_RULES` that reproduces the router's own weights for its own top-K
   from its logits, with the scale factor the call reveals and the per-expert scale a router holds
   (`per_expert_scale`): softmax, sigmoid, top-K-then-softmax, logits that already are probabilities, sqrt-softplus,
   and PhiMoE's sparsemixer, each with or without renormalization over the chosen set.

A router class listed in `ROUTER_ADAPTERS` skips steps 2-3 (an override); every adapter, override or recognized, must
reproduce the stock weights on the probe call, or `find_routers` refuses the model with an error naming the router
class, its module and what an adapter would need.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MoEGRPOError


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

# Routers left alone: hash routers (DeepSeek-V4's first layers) pick experts as a fixed function of the token id, so
# there is no routing to sample or train; those layers keep their stock routing and are not part of the traces.
_FIXED_ROUTERS = ("HashRouter",)

_PROBE_ROWS = 64


class RouterProbe:
    """One call of a router on random hidden states and random parameters, and what came out."""

    def __init__(self, router: nn.Module, block: nn.Module | None):
        self.router = router
        self.block = block
        self.hidden_size = self._hidden_size()
        self.output = self._call()

    def _hidden_size(self) -> int:
        for parameter in self.router.parameters():
            shape = getattr(parameter, "ds_shape", parameter.shape)  # ZeRO-3 partitions parameters
            if len(shape) == 2:
                return int(shape[-1])
        raise MoEGRPOError(
            f"`{_where(self.router)}` has no 2-d weight to read the hidden size from (parameters: "
            f"{[(n, tuple(p.shape)) for n, p in self.router.named_parameters()]})."
        )

    def _call(self):
        generator = torch.Generator().manual_seed(0)
        replaced = {}
        for name, tensor in [*self.router.named_parameters(), *self.router.named_buffers()]:
            shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
            dtype = torch.float32 if tensor.dtype.is_floating_point else tensor.dtype
            if dtype.is_floating_point:
                scale = shape[-1] ** -0.5 if len(shape) == 2 else 0.1
                value = torch.randn(shape, generator=generator) * scale + (1.0 if len(shape) == 1 else 0.0)
            else:
                value = torch.zeros(shape, dtype=dtype)
            replaced[name] = value
        self.replaced = replaced
        extra = []
        for name in list(inspect.signature(self.router.forward).parameters)[1:]:
            # Arguments beyond the hidden states (a bias correction the block owns) come from the block.
            value = getattr(self.block, name, None) if self.block is not None else None
            if not isinstance(value, torch.Tensor):
                break
            shape = tuple(getattr(value, "ds_shape", value.shape))
            extra.append(torch.randn(shape, generator=generator) * 0.1)
        hidden = torch.randn(_PROBE_ROWS, self.hidden_size, generator=generator)
        training = self.router.training
        self.router.train(False)  # jitter and sampling routers are deterministic in eval mode
        try:
            with torch.no_grad():
                try:
                    return torch.func.functional_call(self.router, replaced, (hidden, *extra))
                except Exception:
                    return torch.func.functional_call(self.router, replaced, (hidden[None], *extra))
        except Exception as error:
            raise MoEGRPOError(
                f"Calling router `{_where(self.router)}` on random [{_PROBE_ROWS}, {self.hidden_size}] hidden states "
                f"failed ({type(error).__name__}: {error}); its output contract cannot be read."
            ) from error
        finally:
            self.router.train(training)


def _where(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__name__}"


def _contract(output) -> str | None:
    """`triple`, `dense` or None: which output contract a probe output follows."""
    if isinstance(output, tuple) and len(output) >= 3:
        logits, weights, indices = output[:3]
        if (
            all(isinstance(t, torch.Tensor) for t in (logits, weights, indices))
            and logits.dim() == 2
            and weights.shape == indices.shape == (logits.shape[0], indices.shape[-1])
            and weights.is_floating_point()
            and not indices.is_floating_point()
        ):
            return "triple"
    if isinstance(output, tuple) and len(output) == 2 and all(isinstance(t, torch.Tensor) for t in output):
        scores, logits = output
        if scores.dim() == 2 and scores.shape == logits.shape:
            chosen = (scores != 0).sum(-1)
            if bool((chosen == chosen[0]).all()) and 0 < int(chosen[0]) < scores.shape[-1]:
                return "dense"
    return None


@torch.no_grad()
def _matches(adapter: RouterAdapter, probe_output) -> bool:
    logits, weights, indices = adapter.unpack(probe_output)
    expected = adapter.mixing_weights(logits.float(), indices.long(), like=weights.float())
    return bool(torch.allclose(expected, weights.float(), rtol=1e-4, atol=1e-6))


@torch.no_grad()
def _fitted_scale(adapter: ScoredTopKAdapter, probe_output) -> float | None:
    """The constant factor between the router's weights and `adapter`'s unscaled weights, if there is one."""
    logits, weights, indices = adapter.unpack(probe_output)
    adapter.scale = 1.0
    unscaled = adapter.mixing_weights(logits.float(), indices.long(), like=weights.float())
    if float(unscaled.abs().sum()) == 0.0:
        return None
    scale = float((weights.float() * unscaled).sum() / (unscaled * unscaled).sum())
    for name in ("routed_scaling_factor", "route_scale", "scaling_factor"):
        exact = getattr(adapter.router, name, None)
        if isinstance(exact, (int, float)) and abs(exact - scale) <= 1e-4 * abs(exact):
            return float(exact)
    return 1.0 if abs(scale - 1.0) <= 1e-5 else scale


def recognize(router: nn.Module, block: nn.Module | None = None) -> RouterAdapter:
    """The adapter for `router`, from its class name if listed in `ROUTER_ADAPTERS`, otherwise from its contract.

    Raises:
        MoEGRPOError: naming the router class, its module and what an adapter would need, when no known contract and
            scoring rule reproduces what the router returns.
    """
    top_k, num_experts = getattr(router, "top_k", None), getattr(router, "num_experts", None)
    if isinstance(top_k, int) and isinstance(num_experts, int) and not 1 <= top_k <= num_experts:
        # Probing would fail with torch.topk's "selected index k out of range", as the model's first forward would.
        raise MoEGRPOError(
            f"Router `{_where(router)}` picks top_k={top_k} of num_experts={num_experts} experts: top_k must be "
            "between 1 and num_experts. Set the model config's `num_experts_per_tok` (top-K) to at most the number "
            "of experts."
        )
    probe = RouterProbe(router, block)
    contract = _contract(probe.output)
    route = getattr(block, "route_tokens_to_experts", None)
    if contract is None and isinstance(probe.output, torch.Tensor) and probe.output.dim() == 2 and callable(route):
        return _recognize_logits_only(router, route, probe.output)
    override = ROUTER_ADAPTERS.get(type(router).__name__)
    if override is not None:
        adapter = override(router)
        if contract is None or not _matches(adapter, probe.output):
            raise MoEGRPOError(
                f"Router `{_where(router)}` is registered in `ROUTER_ADAPTERS` with `{override.__name__}`, but that "
                "adapter does not reproduce the router's own weights: the registration is wrong for this version."
            )
        return adapter
    if contract is None:
        raise MoEGRPOError(
            f"Router `{_where(router)}` returns {_describe_output(probe.output)}, an output contract trl-moe-grpo "
            "does not know. An adapter needs the router's logits, the weights and the indices of its chosen experts "
            "from its output, and a way to put replayed ones back: subclass `trl_moe_grpo.routing.RouterAdapter` "
            "(`unpack`, `pack`, `selection_log_probs`, `mixing_weights`) and register it in `ROUTER_ADAPTERS` "
            f"under `{type(router).__name__}`."
        )
    if contract == "dense":
        top_k = int((probe.output[0] != 0).sum(-1)[0])
        num_experts = probe.output[0].shape[-1]
        candidates = [DenseSigmoidAdapter(router, top_k=top_k, num_experts=num_experts)]
    else:
        logits, _, indices = probe.output[:3]
        top_k, num_experts = indices.shape[-1], logits.shape[-1]
        expert_scale = (
            "per_expert_scale" if isinstance(getattr(router, "per_expert_scale", None), torch.Tensor) else None
        )
        candidates = [
            rule(
                router,
                renormalize=renormalize,
                scale=1.0,
                expert_scale=expert_scale,
                top_k=top_k,
                num_experts=num_experts,
            )
            for rule in SCORING_RULES
            for renormalize in (True, False)
        ]
        if isinstance(getattr(router, "router_jitter_noise", None), float):
            candidates.append(SparseMixerAdapter(router, top_k=top_k, num_experts=num_experts))
    for adapter in candidates:
        if isinstance(adapter, ScoredTopKAdapter):
            adapter.expert_scale_values = probe.replaced.get(adapter.expert_scale) if adapter.expert_scale else None
            scale = _fitted_scale(adapter, probe.output)
            matched = scale is not None
            if matched:
                adapter.scale = scale
                matched = _matches(adapter, probe.output)
            adapter.expert_scale_values = None
        else:
            matched = _matches(adapter, probe.output)
        if matched:
            computed = getattr(getattr(block, "experts", None), "num_experts", None)
            if isinstance(computed, int) and computed < adapter.num_experts:
                if int(adapter.unpack(probe.output)[2].max()) < computed:
                    adapter.computed_experts = computed
            return adapter
    raise MoEGRPOError(
        f"Router `{_where(router)}` returns (logits, weights, indices), but its weights follow none of the known "
        "scoring rules of its logits (softmax, sigmoid, top-K then softmax, probabilities, sqrt-softplus, each with "
        "or without renormalization and a constant or per-expert scale; sparsemixer). An adapter needs the rule that "
        "gives a chosen set its weights from the logits: subclass `trl_moe_grpo.routing.RouterAdapter` and register "
        f"it in `ROUTER_ADAPTERS` under `{type(router).__name__}`."
    )


def _recognize_logits_only(router: nn.Module, route: Callable, logits: torch.Tensor) -> RouterAdapter:
    with torch.no_grad():
        weights, indices = route(logits)
        top_k, num_experts = indices.shape[-1], logits.shape[-1]
        # The least likely experts: a set the block's top-K would never choose, to check the masking reaches them.
        other = torch.topk(-logits, top_k, dim=-1).indices
        for rule in SCORING_RULES:
            for renormalize in (True, False):
                adapter = type(f"LogitsOnly{rule.__name__}", (LogitsOnlyContract, rule), {})(
                    router, renormalize=renormalize, top_k=top_k, num_experts=num_experts
                )
                adapter.route = route
                scale = _fitted_scale(adapter, logits)
                if scale is None:
                    continue
                adapter.scale = scale
                if not _matches(adapter, logits):
                    continue
                masked_weights, masked_indices = route(adapter.pack(logits, logits, None, other))
                order = torch.argsort(masked_indices, dim=-1)
                expected = adapter.mixing_weights(logits, other, like=masked_weights.float())
                if torch.equal(masked_indices.gather(-1, order), other.sort(-1).values) and torch.allclose(
                    masked_weights.float().gather(-1, order),
                    expected.gather(-1, torch.argsort(other, dim=-1)),
                    rtol=1e-4,
                    atol=1e-6,
                ):
                    return adapter
    raise MoEGRPOError(
        f"Router `{_where(router)}` returns only logits and its block chooses the experts "
        "(`route_tokens_to_experts`) by a rule whose weights for a set are not a renormalized function of the set's "
        "logits, so a replayed set cannot be handed to the block through the logits alone. An adapter would need to "
        "replace the block's `(weights, indices)` before its experts run."
    )


def _describe_output(output) -> str:
    if isinstance(output, torch.Tensor):
        return f"a single tensor of shape {tuple(output.shape)}"
    if isinstance(output, tuple):
        parts = [f"{tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in output]
        return f"a {len(output)}-tuple ({', '.join(parts)})"
    return f"a `{type(output).__name__}`"


_ROUTER_WORDS = ("router", "gate", "gating")
# Child names of an MoE block that hold one modality's experts and router (ERNIE 4.5-VL), text first.
_MODALITY_GROUPS = ("text_moe", "vision_moe")


def _router_candidates(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """`(name, module, block)` of every module that looks like a router, in forward (registration) order."""
    found: dict[str, tuple[nn.Module, nn.Module | None]] = {}
    for block_name, block in model.named_modules():
        if not isinstance(getattr(block, "experts", None), nn.Module):
            continue
        for child_name, child in block.named_children():
            lowered = (child_name + type(child).__name__).lower()
            if child_name == "experts" or "shared" in lowered or not any(w in lowered for w in _ROUTER_WORDS):
                continue
            name = f"{block_name}.{child_name}" if block_name else child_name
            while isinstance(getattr(child, "base_layer", None), nn.Module):
                # A PEFT wrapper (LoRA on the router's weight): the router is the wrapped module, which the wrapper
                # calls with the adapted weight. Probing the wrapper itself would swap its weight under PEFT's feet.
                child, name = child.base_layer, f"{name}.base_layer"
            if next(child.parameters(), None) is None or type(child).__name__.endswith(_FIXED_ROUTERS):
                continue
            found[name] = (child, block)
    for name, module in model.named_modules():
        cls = type(module).__name__
        fixed = cls.endswith(_FIXED_ROUTERS)
        if name not in found and not fixed and cls.endswith(("Router", "Gating")) and hasattr(module, "top_k"):
            found[name] = (module, None)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return [(name, module, block) for name, (module, block) in sorted(found.items(), key=lambda kv: order[kv[0]])]


def _expert_blocks(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(getattr(m, "experts", None), nn.Module)]


def _refuse_tower_routers(model: nn.Module, candidates: list[tuple[str, nn.Module, nn.Module | None]]) -> None:
    """Refuse routers of a generating model that lie outside its language decoder (a vision or audio tower's MoE).

    Such a router routes image patches or audio frames, not the decoder's tokens a routing trace has one slot per
    layer for; its routes could be neither laid out nor replayed per token.
    """
    get_decoder = getattr(model, "get_decoder", None)
    if not callable(getattr(model, "generate", None)) or get_decoder is None:
        return  # not a text generator (e.g. `clip_moe`'s vision encoder, whose routers are the ones to control)
    try:
        decoder = get_decoder()
    except Exception:  # transformers' best-effort lookup raises for a few exotic models
        return
    if not isinstance(decoder, nn.Module) or decoder is model:
        return
    inside = {id(m) for m in decoder.modules()}
    outside = [(name, module) for name, module, _ in candidates if id(module) not in inside]
    if outside:
        name, module = outside[0]
        where = next((n for n, m in model.named_modules() if m is decoder), type(decoder).__name__)
        raise MoEGRPOError(
            f"Router `{_where(module)}` at `{name}` lies outside the language decoder (`{where}`) of "
            f"`{type(model).__name__}`, in a vision or audio tower whose patches or frames have no place in routing "
            "traces (one route per layer for each decoder token); Mixture-of-Experts layers outside the language "
            "decoder are not supported."
        )


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module, RouterAdapter]]:
    """The MoE routers of `model` in forward order, each with its adapter.

    Raises:
        MoEGRPOError: when `model` has no experts (a dense model), or an MoE block whose router has no known contract
            (the error names the router class, its module and what an adapter needs).
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and _expert_blocks(model):
        raise MoEGRPOError(
            f"`{type(model).__name__}` is an encoder-decoder Mixture-of-Experts model. MoE-GRPO's routing traces are "
            "laid out like a decoder-only model's token ids (TRL's GRPO trains causal LMs and vision-language "
            "decoders), so encoder-decoder MoEs (Switch Transformers, NLLB-MoE) are not supported."
        )
    candidates = _router_candidates(model)
    _refuse_tower_routers(model, candidates)
    routers = []
    routed_blocks: set[int] = set()
    refused: dict[int, MoEGRPOError] = {}  # by block (or router) identity: the first refusal
    for name, module, block in candidates:
        key = id(block if block is not None else module)
        try:
            adapter = recognize(module, block)
            group = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
            if group in _MODALITY_GROUPS:
                adapter.modality_group = _MODALITY_GROUPS.index(
                    group
                )  # 0 text, 1 vision (the controller's TEXT, VISION)
            routers.append((name, module, adapter))
            routed_blocks.add(key)
        except MoEGRPOError as error:
            refused.setdefault(key, MoEGRPOError(f"At `{name}`: {error}"))
    for key, error in refused.items():
        if key not in routed_blocks:  # a block whose routing no candidate could take over
            raise error
    blocks = _expert_blocks(model)
    if not routers:
        if blocks:
            raise MoEGRPOError(
                f"`{type(model).__name__}` has Mixture-of-Experts blocks (`{blocks[0]}`: "
                f"`{_where(dict(model.named_modules())[blocks[0]])}`) but no router module next to their experts: its "
                "routing happens inside the block, where trl-moe-grpo cannot replace it without re-implementing the "
                "block. An adapter needs a router module returning the chosen experts and their weights."
            )
        raise MoEGRPOError(
            f"`{type(model).__name__}` has no Mixture-of-Experts router, so there is no routing to sample or train: "
            "MoE-GRPO needs an MoE model. Convert a dense model first (e.g. `trl-moe-grpo upcycle`), or train a dense "
            "model with `trl.GRPOTrainer`. Routers are recognized by their output contract and scoring rule; classes "
            "recognized by name: " + ", ".join(sorted(ROUTER_ADAPTERS)) + "."
        )
    return routers
