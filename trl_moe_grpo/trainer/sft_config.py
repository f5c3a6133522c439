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
            Gaussian noise of std `routing_noise_std` on the gate log-scores, then top-K (Stoch-FT-Noise).
            `"expert_choice"`: every expert takes the tokens of the batch it scores highest, up to its capacity
            (Expert Choice routing). `"sinkhorn"`: Sinkhorn iterations balance the batch's gate probabilities to equal
            expert loads, then each token takes its top-K (optimal-transport routing). The last two route a token by
            looking at the whole batch, later tokens included, so they exist for training only. Evaluation and
            inference always use top-K.
        routing_noise_std (`float`, *optional*, defaults to `1.0`):
            Standard deviation of the gate noise of `train_routing="noise"`.
        expert_capacity_factor (`float`, *optional*, defaults to `1.0`):
            Capacity factor of `train_routing="expert_choice"`: each expert takes
            `ceil(expert_capacity_factor * tokens * top_k / num_experts)` of a layer's non-padding tokens, so `1.0`
            fills as many expert slots as top-K routing does. A token no expert takes passes through the residual
            connection only; one taken by more than top_k experts keeps its top_k most probable ones.
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
            "gate probabilities, Stoch-FT-Multi), 'noise' (Gaussian noise on the gate log-scores, then top-K, "
            "Stoch-FT-Noise), 'expert_choice' (experts pick their top tokens under a capacity) or 'sinkhorn' "
            "(Sinkhorn-balanced assignment). Evaluation and inference use top-K."
        },
    )
    routing_noise_std: float = field(
        default=1.0,
        metadata={"help": "Standard deviation of the gate noise of train_routing='noise'."},
    )
    expert_capacity_factor: float = field(
        default=1.0,
        metadata={
            "help": "Capacity factor of train_routing='expert_choice': each expert takes "
            "ceil(factor * tokens * top_k / num_experts) non-padding tokens per layer."
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
