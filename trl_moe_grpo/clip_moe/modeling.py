"""CLIP-MoE: transformers' CLIP whose vision encoder's MLPs are Mixture-of-Experts layers.

Everything but the vision encoder's MLPs is stock CLIP (`transformers.models.clip`): the text tower, the attention,
the embeddings, the projections and the logit scale, with CLIP's own checkpoint keys. Each MLP of the vision encoder
(`fc1 -> act -> fc2`, with biases) becomes a [`CLIPMoeSparseMoeBlock`]:

- [`CLIPMoeTopKRouter`]: the router-module contract of transformers 5's MoE routers (shaped like `Qwen3MoeTopKRouter`):
  attributes `top_k`, `num_experts`, `norm_topk_prob`, `weight` `[num_experts, hidden]`; `forward` returns
  `(router_logits, weights, indices)` with the softmax-then-top-K rule. So `trl_moe_grpo.routing`'s
  `SoftmaxTopKAdapter`, `RoutingController`, sampling, replay and the losses apply unchanged.
- [`CLIPMoeExperts`]: the experts as fused 3-D parameters, `fc1` `[experts, intermediate, hidden]` (+ `fc1_bias`) and
  `fc2` `[experts, hidden, intermediate]` (+ `fc2_bias`), computed like transformers' eager expert path (one
  `index_select`-style gather per expert that has tokens, never a loop over tokens). transformers' fused experts are
  gated (`gate_up_proj`) or, for the one non-gated family (`NemotronHExperts`), bias-free; CLIP's MLPs have biases, so
  the experts module is written here.

The classes are registered with `AutoConfig` / `AutoModel` when this module is imported
(`import trl_moe_grpo.clip_moe`), so `AutoModel.from_pretrained(folder)` loads a saved CLIP-MoE with no remote code.

The routers are found and driven on the vision *encoder* (`vision_encoder(model)`): the encoder is called with
`inputs_embeds` `[images, tokens, hidden]`, which is what the routing controller's model pre-hook reads, and every
token of the encoder (the class token and the patch tokens) is routed in every MoE layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
)
from transformers.activations import ACT2FN
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPEncoderLayer

from ..errors import MoEGRPOError


@strict
class CLIPMoeVisionConfig(CLIPVisionConfig):
    r"""
    [`CLIPVisionConfig`] plus the Mixture-of-Experts fields of the vision encoder.

    Parameters:
        num_experts (`int`, *optional*, defaults to 8):
            Experts per MoE layer.
        num_experts_per_tok (`int`, *optional*, defaults to 2):
            Experts each token is routed to (top-K).
        norm_topk_prob (`bool`, *optional*, defaults to `True`):
            Renormalize the top-K gate probabilities to sum to 1 (then identical experts compute the dense MLP).
        moe_layers (`list[int]`, *optional*):
            Indices of the encoder layers whose MLP is an MoE; `None`: every layer.
        router_aux_loss_coef (`float`, *optional*, defaults to 0.01):
            Default weight of the load-balancing loss for the trainers in `trl_moe_grpo.clip_moe`.
    """

    model_type = "clip_moe_vision_model"

    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    moe_layers: list[int] | None = None
    router_aux_loss_coef: float = 0.01

    def validate_architecture(self):
        super().validate_architecture()
        if self.num_experts < 2 or not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise MoEGRPOError(
                f"num_experts={self.num_experts}, num_experts_per_tok={self.num_experts_per_tok}: an MoE needs at "
                "least 2 experts and 1 <= top-K <= num_experts."
            )
        for layer in self.moe_layers or []:
            if not 0 <= layer < self.num_hidden_layers:
                raise MoEGRPOError(
                    f"moe_layers holds {layer}, but the vision encoder has layers 0..{self.num_hidden_layers - 1}."
                )

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_layers is None or layer in self.moe_layers


@strict
class CLIPMoeConfig(CLIPConfig):
    r"""
    [`CLIPConfig`] whose `vision_config` is a [`CLIPMoeVisionConfig`]; the text config is CLIP's own.
    """

    model_type = "clip_moe"
    sub_configs_defaults = {"vision_config": CLIPMoeVisionConfig, "text_config": CLIPTextConfig}


class CLIPMoeTopKRouter(nn.Module):
    """Softmax-then-top-K router with transformers 5's router-module contract (as `Qwen3MoeTopKRouter`)."""

    def __init__(self, config: CLIPMoeVisionConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)  # (tokens, num_experts)
        router_probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
        router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
        return router_logits, router_top_value.to(router_logits.dtype), router_indices


class CLIPMoeExperts(nn.Module):
    """CLIP MLPs (`fc1 -> act -> fc2`, with biases) as fused 3-D expert parameters."""

    def __init__(self, config: CLIPMoeVisionConfig):
        super().__init__()
        self.num_experts = config.num_experts
        hidden, intermediate = config.hidden_size, config.intermediate_size
        self.fc1 = nn.Parameter(torch.empty(self.num_experts, intermediate, hidden))
        self.fc1_bias = nn.Parameter(torch.zeros(self.num_experts, intermediate))
        self.fc2 = nn.Parameter(torch.empty(self.num_experts, hidden, intermediate))
        self.fc2_bias = nn.Parameter(torch.zeros(self.num_experts, hidden))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """`[tokens, hidden]` mixture of each token's `top_k_index` experts with weights `top_k_weights`."""
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # [E, K, tokens]
            expert_hit = expert_mask.sum(dim=(-1, -2)).nonzero().flatten().tolist()
        for expert in expert_hit:
            slot, token = torch.where(expert_mask[expert])
            state = hidden_states.index_select(0, token)
            state = self.act_fn(F.linear(state, self.fc1[expert], self.fc1_bias[expert]))
            state = F.linear(state, self.fc2[expert], self.fc2_bias[expert])
            output.index_add_(0, token, (state * top_k_weights[token, slot, None]).to(output.dtype))
        return output


class CLIPMoeSparseMoeBlock(nn.Module):
    """The MoE layer replacing one `CLIPMLP`: the router, then the chosen experts, mixed by the router's weights."""

    def __init__(self, config: CLIPMoeVisionConfig):
        super().__init__()
        self.gate = CLIPMoeTopKRouter(config)
        self.experts = CLIPMoeExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, routing_weights, selected_experts = self.gate(flat)
        return self.experts(flat, selected_experts, routing_weights).reshape(shape)


class CLIPMoeEncoderLayer(CLIPEncoderLayer):
    """`CLIPEncoderLayer` whose MLP is a [`CLIPMoeSparseMoeBlock`] (or CLIP's dense MLP, outside `moe_layers`)."""

    def __init__(self, config: CLIPMoeVisionConfig, layer: int):
        super().__init__(config)
        if config.is_moe_layer(layer):
            self.mlp = CLIPMoeSparseMoeBlock(config)


class CLIPMoeEncoder(CLIPEncoder):
    """`CLIPEncoder` with [`CLIPMoeEncoderLayer`] layers."""

    def __init__(self, config: CLIPMoeVisionConfig):
        super().__init__(config)
        self.layers = nn.ModuleList([CLIPMoeEncoderLayer(config, i) for i in range(config.num_hidden_layers)])


def _init_moe_weights(module: nn.Module, config: CLIPMoeVisionConfig, factor: float) -> None:
    """CLIP's own MLP initialization, per expert; routers normal with `initializer_range`."""
    if isinstance(module, CLIPMoeTopKRouter):
        nn.init.normal_(module.weight, std=config.initializer_range * factor)
    elif isinstance(module, CLIPMoeExperts):
        fc1_std = (2 * config.hidden_size) ** -0.5 * factor
        fc2_std = (config.hidden_size**-0.5) * ((2 * config.num_hidden_layers) ** -0.5) * factor
        nn.init.normal_(module.fc1, std=fc1_std)
        nn.init.normal_(module.fc2, std=fc2_std)
        nn.init.zeros_(module.fc1_bias)
        nn.init.zeros_(module.fc2_bias)


class CLIPMoeVisionModel(CLIPVisionModel):
    """`CLIPVisionModel` with a Mixture-of-Experts encoder."""

    config_class = CLIPMoeVisionConfig
    config: CLIPMoeVisionConfig
    _no_split_modules = ["CLIPMoeEncoderLayer", "CLIPVisionEmbeddings"]

    def __init__(self, config: CLIPMoeVisionConfig):
        super().__init__(config)
        self.encoder = CLIPMoeEncoder(config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        _init_moe_weights(module, self.config, self.config.initializer_factor)


class CLIPMoeModel(CLIPModel):
    """`CLIPModel` whose vision tower is a [`CLIPMoeVisionModel`]."""

    config_class = CLIPMoeConfig
    config: CLIPMoeConfig
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPMoeEncoderLayer", "CLIPVisionEmbeddings"]

    def __init__(self, config: CLIPMoeConfig):
        super().__init__(config)
        self.vision_model = CLIPMoeVisionModel._from_config(config.vision_config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        _init_moe_weights(module, self.config.vision_config, self.config.initializer_factor)


def vision_encoder(model: nn.Module) -> nn.Module:
    """The vision encoder of a CLIP-MoE (`CLIPMoeModel` or `CLIPMoeVisionModel`): the module the routers run in.

    Build the routing controller on it: `RoutingController(vision_encoder(model))`.
    """
    vision = getattr(model, "vision_model", model)
    encoder = getattr(vision, "encoder", None)
    if not isinstance(encoder, CLIPMoeEncoder):
        raise MoEGRPOError(
            f"`{type(model).__name__}` has no CLIP-MoE vision encoder. Upcycle a CLIP first "
            "(`trl-moe-grpo upcycle CLIP_FOLDER --output DIR`, or `trl_moe_grpo.clip_moe.upcycle_clip`)."
        )
    return encoder


AutoConfig.register(CLIPMoeVisionConfig.model_type, CLIPMoeVisionConfig, exist_ok=True)
AutoConfig.register(CLIPMoeConfig.model_type, CLIPMoeConfig, exist_ok=True)
AutoModel.register(CLIPMoeVisionConfig, CLIPMoeVisionModel, exist_ok=True)
AutoModel.register(CLIPMoeConfig, CLIPMoeModel, exist_ok=True)
