"""CLIP -> CLIP-MoE: every MLP of the vision encoder becomes `num_experts` experts and a router.

Experts start from the dense MLP as for the language models (`trl_moe_grpo.upcycle.init.ExpertInit`: `copy`, `noise`,
`drop`): `fc1` is treated as an up projection (neurons are its rows) and `fc2` as a down projection (neurons are its
columns). The MLPs' biases follow their neurons: `copy` copies them; `noise` adds noise of `noise_std` times the
bias's own std (a bias with zero std stays as it is); `drop` re-draws the `fc1` bias of the dropped neurons from a
normal with the bias's mean and std, the same neurons `ExpertInit` drops in the two matrices. `fc2`'s bias belongs
to the output, not to a neuron: every expert keeps it. Routers start normal with std `router_std`. Everything
else (text tower, attention, embeddings, projections, logit scale) is copied unchanged.

With `copy` and the top-K weights renormalized (`norm_topk_prob=True`, the default), the CLIP-MoE computes exactly
the dense CLIP's image embeddings (tested).

This module converts in memory; `convert.py` upcycles a saved CLIP folder into a saved CLIP-MoE folder, and
`multiplet.py` is the CLIP-MoE paper's Diversified Multiplet Upcycling, which builds on this conversion.
"""

from __future__ import annotations

import torch
from transformers import CLIPModel

from ..errors import MoEGRPOError
from ..upcycle.init import DEFAULT_INIT, ExpertInit, resolve_init
from .modeling import CLIPMoeConfig, CLIPMoeModel


def moe_config_from_clip(
    dense_config, num_experts: int, top_k: int, moe_layers: list[int] | None = None
) -> CLIPMoeConfig:
    """The CLIP-MoE config of a dense `CLIPConfig`: its values, with MoE fields in the vision config."""
    if getattr(dense_config, "model_type", None) != "clip":
        raise MoEGRPOError(
            f"Cannot upcycle a `{getattr(dense_config, 'model_type', type(dense_config).__name__)}` into CLIP-MoE: "
            "the source must be a dense transformers CLIP (`model_type` 'clip', `CLIPModel`)."
        )
    if num_experts < 2 or not 1 <= top_k <= num_experts:
        raise MoEGRPOError(
            f"num_experts={num_experts}, top_k={top_k}: an MoE needs at least 2 experts and 1 <= top_k <= "
            "num_experts (the paper uses 8 and 2)."
        )
    values = dense_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "_name_or_path"):
        values.pop(key, None)
    vision = {k: v for k, v in values.pop("vision_config").items() if k not in ("model_type", "transformers_version")}
    vision.update(num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True, moe_layers=moe_layers)
    values["vision_config"] = vision
    values["architectures"] = ["CLIPMoeModel"]
    return CLIPMoeConfig(**values)


def upcycle_clip_model(
    dense: CLIPModel,
    num_experts: int = 8,
    top_k: int = 2,
    init: ExpertInit | str = DEFAULT_INIT,
    *,
    moe_layers: list[int] | None = None,
) -> CLIPMoeModel:
    """A `CLIPMoeModel` whose vision MLPs are upcycled from the dense `CLIPModel` `dense` (module docstring).

    `init` is an `ExpertInit` or the name of a kind (`copy`, `noise`, `drop`) with its default settings.
    """
    if not isinstance(dense, CLIPModel) or isinstance(dense, CLIPMoeModel):
        raise MoEGRPOError(
            f"`upcycle_clip_model` takes a dense `transformers.CLIPModel`, got `{type(dense).__name__}`."
        )
    expert_init = resolve_init(init)
    expert_init.require_computed("`upcycle_clip_model`")
    config = moe_config_from_clip(dense.config, num_experts, top_k, moe_layers)
    with torch.device("meta"):
        moe = CLIPMoeModel(config)
    dense_state = dense.state_dict()
    state = {}
    for key in moe.state_dict():
        if key in dense_state:
            state[key] = dense_state[key].detach().clone()
    prefix = "vision_model.encoder.layers"
    vision = config.vision_config
    for layer in range(vision.num_hidden_layers):
        if not vision.is_moe_layer(layer):
            continue
        source, target = f"{prefix}.{layer}.mlp", f"{prefix}.{layer}.mlp"
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            state.pop(f"{source}.{name}", None)
        experts = [_expert(expert_init, dense_state, source, f"{target}.experts", e) for e in range(num_experts)]
        for field in ("fc1", "fc1_bias", "fc2", "fc2_bias"):
            state[f"{target}.experts.{field}"] = torch.stack([expert[field] for expert in experts])
        weight = dense_state[f"{source}.fc1.weight"]
        state[f"{target}.gate.weight"] = expert_init.router(
            num_experts, vision.hidden_size, weight.dtype, f"{target}.gate.weight"
        )
    moe.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers (position ids) are not in a state dict: rebuild them off the meta device.
    for name, buffer in list(moe.named_buffers()):
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            module = moe.get_submodule(module_name)
            module.register_buffer(buffer_name, dict(dense.named_buffers())[name].clone(), persistent=False)
    return moe.to(dense.dtype)


def _expert(init: ExpertInit, dense: dict, source: str, target: str, expert: int) -> dict[str, torch.Tensor]:
    """One expert's `fc1`, `fc1_bias`, `fc2`, `fc2_bias` from the dense MLP at `source`."""
    neuron_key = f"{target}.{expert}"
    fc1 = init.expert(dense[f"{source}.fc1.weight"], "up", f"{target}.fc1.{expert}", neuron_key)
    fc2 = init.expert(dense[f"{source}.fc2.weight"], "down", f"{target}.fc2.{expert}", neuron_key)
    fc1_bias = dense[f"{source}.fc1.bias"].clone()
    fc2_bias = dense[f"{source}.fc2.bias"].clone()
    if init.kind == "noise":
        fc1_bias = _noisy(init, fc1_bias, f"{target}.fc1_bias.{expert}")
        fc2_bias = _noisy(init, fc2_bias, f"{target}.fc2_bias.{expert}")
    elif init.kind == "drop":
        # The neurons ExpertInit dropped from this expert's fc1 rows and fc2 columns (same generator, same draw).
        intermediate = fc1_bias.shape[0]
        dropped = torch.randperm(intermediate, generator=init.generator(neuron_key))
        dropped = dropped[: round(init.drop_ratio * intermediate)]
        bias = fc1_bias.float()
        fresh = torch.randn(len(dropped), generator=init.generator(f"{target}.fc1_bias.{expert}"))
        bias[dropped] = fresh * bias.std() + bias.mean()
        fc1_bias = bias.to(fc1_bias.dtype)
    return {"fc1": fc1, "fc1_bias": fc1_bias, "fc2": fc2, "fc2_bias": fc2_bias}


def _noisy(init: ExpertInit, bias: torch.Tensor, key: str) -> torch.Tensor:
    value = bias.float()
    std = value.std() if value.numel() > 1 else torch.tensor(0.0)
    noise = torch.randn(value.shape, generator=init.generator(key))
    return (value + noise * (init.noise_std * std)).to(bias.dtype)


def active_parameters(model: CLIPMoeModel) -> int:
    """Parameters one token uses: everything except the experts a top-K token does not visit."""
    vision = model.config.vision_config
    total = sum(p.numel() for p in model.parameters())
    per_expert = 2 * vision.hidden_size * vision.intermediate_size + vision.intermediate_size + vision.hidden_size
    moe_layers = sum(vision.is_moe_layer(i) for i in range(vision.num_hidden_layers))
    return total - moe_layers * (vision.num_experts - vision.num_experts_per_tok) * per_expert
