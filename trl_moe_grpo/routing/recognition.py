"""Finding a model's routers and recognizing each by what it does, not by its class name (`docs/design.md` §4).

1. A router is a child of an MoE block (a module with an `experts` child) whose name or class says router or gate
   (shared-expert gates excepted), or any module whose class name ends in `Router` and that has `top_k`.
2. Its output contract is read from one call on random hidden states and random parameters (never the model's own):
   `(logits, weights, indices, ...)` with `[rows, experts]`, `[rows, k]`, `[rows, k]` integer tensors (most
   families), Llama 4's `(dense_scores, logits)`, or logits only with the block choosing (DBRX).
3. Its scoring rule is the first rule of `SCORING_RULES` (`routing/adapters.py`) that reproduces the router's own
   weights for its own top-K from its logits, with the scale factor the call reveals and the per-expert scale a
   router holds (`per_expert_scale`).

A router class listed in `ROUTER_ADAPTERS` skips steps 2-3 (an override); every adapter, override or recognized, must
reproduce the stock weights on the probe call, or `find_routers` refuses the model with an error naming the router
class, its module and what an adapter would need.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from ..errors import MoEGRPOError
from .adapters import (
    ROUTER_ADAPTERS,
    SCORING_RULES,
    DenseSigmoidAdapter,
    LogitsOnlyContract,
    RouterAdapter,
    ScoredTopKAdapter,
    SparseMixerAdapter,
)

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
