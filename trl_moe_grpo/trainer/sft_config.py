"""`MoESFTConfig`: TRL's `SFTConfig` plus the routing of the training forward (the fine-tuning baselines)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trl import SFTConfig

from .options import check_router_options, check_training_routing_options

ROUTING_FILE = "moe_sft_routing.json"
# Saved with every checkpoint and final model.
ROUTING_OPTIONS = (
    "train_routing",
    "routing_noise_std",
    "noisy_mixing_weights",
    "expert_capacity_factor",
    "sinkhorn_iterations",
    "router_learning_rate",
)


@dataclass
class MoESFTConfig(SFTConfig):
    r"""
    Configuration class for [`MoESFTTrainer`]: every parameter of `trl.SFTConfig`, plus the ones below.

    Parameters:
        > Parameters that control the training forward's routing

        train_routing (`str`, *optional*, defaults to `"topk"`):
            How the routers choose experts in the training forward. `"topk"`: the stock top-K (Det-FT). `"sample"`:
            K experts per token drawn without replacement from the gate probabilities (Stoch-FT-Multi). `"noise"`:
            V-MoE's noisy top-K, Gaussian noise of std `routing_noise_std` on the router logits, then top-K
            (Stoch-FT-Noise). `"expert_choice"`: every expert takes the tokens of the batch it scores highest, up to
            its capacity, and a token keeps every expert that took it, weighted by its gate probability (Expert
            Choice routing, Zhou et al. 2022). `"sinkhorn"`: Sinkhorn iterations balance the batch's gate
            probabilities to equal expert mass, then each token takes its top-K (optimal-transport routing). The
            last two route a token by looking at the whole batch, later tokens included, so they exist for training
            only. Evaluation and inference always use top-K.
        routing_noise_std (`float` or `None`, *optional*, defaults to `None`):
            Standard deviation of the logit noise of `train_routing="noise"`. `None`: `1 / num_experts`, V-MoE's
            value (0.125 for 8 experts); the earlier default was `1.0`.
        noisy_mixing_weights (`bool`, *optional*, defaults to `True`):
            Under `train_routing="noise"`, mix the chosen experts with the weights of the *noisy* logits (V-MoE's
            noisy softmax, through the router family's rule). `False` mixes with the noise-free logits' weights,
            so the noise only changes which experts are chosen (the behaviour before this option existed).
        expert_capacity_factor (`float`, *optional*, defaults to `1.0`):
            Capacity factor of `train_routing="expert_choice"`: each expert takes
            `ceil(expert_capacity_factor * tokens * top_k / num_experts)` of a layer's non-padding tokens, so `1.0`
            fills as many expert slots as top-K routing does. A token keeps every expert that took it (0 to
            num_experts of them); one no expert takes passes through the residual connection only, and the trainer
            warns once when that is more than a quarter of a batch's tokens.
        sinkhorn_iterations (`int`, *optional*, defaults to `3`):
            Sinkhorn iterations of `train_routing="sinkhorn"` (each normalizes tokens, then experts).

        > Parameters that control the routers' optimization

        router_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Peak learning rate of the router weights, shaped by the same scheduler as `learning_rate`. `None` uses
            `learning_rate`.

    The load-balancing loss (`router_aux_loss_coef`, inherited: `None` takes the coefficient of the model's config, `0`
    turns it off) is computed on the experts the tokens were dispatched to under `train_routing`, not on a fresh top-K.
    """

    train_routing: Literal["topk", "sample", "noise", "expert_choice", "sinkhorn"] = field(
        default="topk",
        metadata={
            "help": "Routing of the training forward: 'topk' (stock, Det-FT), 'sample' (without replacement from the "
            "gate probabilities, Stoch-FT-Multi), 'noise' (V-MoE's noisy top-K, "
            "Stoch-FT-Noise), 'expert_choice' (experts pick their top tokens under a capacity) or 'sinkhorn' "
            "(Sinkhorn-balanced assignment). Evaluation and inference use top-K."
        },
    )
    routing_noise_std: float | None = field(
        default=None,
        metadata={
            "help": "Standard deviation of the router-logit noise of train_routing='noise'. None: 1 / num_experts "
            "(V-MoE); 1.0 was the earlier default."
        },
    )
    noisy_mixing_weights: bool = field(
        default=True,
        metadata={
            "help": "Under train_routing='noise', mix the chosen experts with the noisy logits' weights (V-MoE's "
            "noisy softmax); False uses the noise-free weights."
        },
    )
    expert_capacity_factor: float = field(
        default=1.0,
        metadata={
            "help": "Capacity factor of train_routing='expert_choice': each expert takes "
            "ceil(factor * tokens * top_k / num_experts) non-padding tokens per layer; a token keeps every expert "
            "that took it."
        },
    )
    sinkhorn_iterations: int = field(
        default=3,
        metadata={"help": "Sinkhorn iterations of train_routing='sinkhorn'."},
    )
    router_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the router weights (None: learning_rate)."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_training_routing_options(self)
        check_router_options(self)
