"""Configurations of the CLIP-MoE classification trainers: `CLIPMoEGRPOConfig` (MoE-GRPO) and `CLIPDetFTConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from ..errors import MoEGRPOError
from ..losses import GATE_LOSS_TYPES
from ..trainer.options import check_router_options, check_training_routing_options
from .classify import DEFAULT_TEMPLATE
from .rewards import SCALE_REWARDS

TRAIN_PARAMETERS = ("vision", "routers")


@dataclass
class CLIPClassificationConfig(TrainingArguments):
    r"""
    What both CLIP-MoE classification trainers share: every parameter of `transformers.TrainingArguments`, plus the
    ones below. `remove_unused_columns` defaults to `False` (the trainers read the `image` and `label` columns).

    Parameters:
        class_template (`str`, *optional*, defaults to `"a photo of a {}"`):
            Prompt of each class for the zero-shot classifier; `{}` is replaced by the class name.
        train_parameters (`str`, *optional*, defaults to `"vision"`):
            What trains: `"vision"` the whole vision tower and its projection, `"routers"` the MoE routers only. The
            text tower and the logit scale never train (the class embeddings are computed once).
        router_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Peak learning rate of the router weights, shaped by the same scheduler. `None` uses `learning_rate`.
        router_aux_loss_coef (`float` or `None`, *optional*, defaults to `None`):
            Weight of the load-balancing loss on the routed sets. `None` takes the model's
            `vision_config.router_aux_loss_coef`; `0` turns it off.
    """

    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep every dataset column: the trainers read `image` and `label` themselves."},
    )
    class_template: str = field(
        default=DEFAULT_TEMPLATE,
        metadata={"help": "Prompt of each class for the zero-shot classifier; `{}` is the class name."},
    )
    train_parameters: Literal["vision", "routers"] = field(
        default="vision",
        metadata={"help": "What trains: 'vision' (vision tower and projection) or 'routers' (MoE routers only)."},
    )
    router_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the router weights (None: learning_rate)."},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the load-balancing loss (None: the model's config; 0: off)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if "{}" not in self.class_template:
            raise MoEGRPOError(
                f"`class_template={self.class_template!r}` has no `{{}}` for the class name, e.g. 'a photo of a {{}}'."
            )
        if self.train_parameters not in TRAIN_PARAMETERS:
            raise MoEGRPOError(f"`train_parameters={self.train_parameters!r}`: use one of {TRAIN_PARAMETERS}.")
        if self.gradient_checkpointing:
            raise MoEGRPOError(
                "`gradient_checkpointing=True` is not supported by the CLIP-MoE trainers (the tiny vision encoder "
                "does not need it, and replayed routes are captured once per forward). Set "
                "`gradient_checkpointing=False`."
            )
        check_router_options(self)


@dataclass
class CLIPMoEGRPOConfig(CLIPClassificationConfig):
    r"""
    Configuration of [`CLIPMoEGRPOTrainer`]: every parameter of [`CLIPClassificationConfig`], plus the ones below.

    Parameters:
        train_parameters (`str`, *optional*, defaults to `"routers"`):
            As in [`CLIPClassificationConfig`], but the routers by default: the routing is the policy. Gate-GRPO's
            gradient also reaches the rest of the vision tower through the hidden states the routers read, but the
            reward depends on those weights directly too (through the image embedding), which the policy gradient does
            not see; with no token loss to hold the embedding in place, training the whole tower with it alone
            degraded accuracy in the miniature (`docs/results-clip.md`, the whole-vision-tower ablation).

        > Rollouts

        num_generations (`int`, *optional*, defaults to `8`):
            G: forward passes of the vision encoder per image, each with routing sampled from the gates.

        > Advantages and loss

        scale_rewards (`str`, *optional*, defaults to `"group"`):
            Advantage scaling as TRL's `scale_rewards`: `"group"` (divide by the group's std), `"batch"`, `"none"`.
        loss_type (`str`, *optional*, defaults to `"grpo"`):
            Normalization of the Gate-GRPO loss, as TRL's `loss_type`: `"grpo"` (per rollout, then mean), `"bnpo"`,
            `"dr_grpo"`, `"dapo"` (over the routed tokens of the batch), or `"sapo"` (SAPO's soft gate, per rollout).
        epsilon (`float`, *optional*, defaults to `0.2`):
            Lower clipping range of the importance ratio.
        epsilon_high (`float` or `None`, *optional*, defaults to `None`):
            Upper clipping range; `None` uses `epsilon`.
        set_log_prob (`str`, *optional*, defaults to `"set"`):
            `"set"`: the exact probability of the unordered expert set (top-K <= 4); `"ordered"`: of the drawn order.
        gate_loss_tokens (`str`, *optional*, defaults to `"all"`):
            Tokens of the vision encoder whose routing Gate-GRPO scores: `"all"` (the class token and every patch)
            or `"patches"` (the patch tokens only). Every token is routed either way.
    """

    train_parameters: Literal["vision", "routers"] = field(
        default="routers",
        metadata={"help": "What trains: 'routers' (the MoE routers: the policy, default) or 'vision' (the tower)."},
    )
    num_generations: int = field(
        default=8,
        metadata={"help": "G: sampled-routing forward passes of the vision encoder per image."},
    )
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group",
        metadata={"help": "Advantage scaling: 'group' (std of the group), 'batch' or 'none'."},
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "sapo"] = field(
        default="grpo",
        metadata={"help": "Normalization of the Gate-GRPO loss, as TRL's loss_type."},
    )
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping range of the importance ratio."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clipping range of the importance ratio (None: epsilon)."}
    )
    set_log_prob: Literal["set", "ordered"] = field(
        default="set",
        metadata={"help": "'set': exact probability of the unordered expert set; 'ordered': of the drawn order."},
    )
    gate_loss_tokens: Literal["all", "patches"] = field(
        default="all",
        metadata={"help": "Tokens whose routing Gate-GRPO scores: 'all' (class token and patches) or 'patches'."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2:
            raise MoEGRPOError(
                f"`num_generations={self.num_generations}`: group-relative advantages need at least 2 rollouts per "
                "image (the paper uses 8)."
            )
        if self.scale_rewards not in SCALE_REWARDS:
            raise MoEGRPOError(f"`scale_rewards={self.scale_rewards!r}`: use one of {SCALE_REWARDS}.")
        if self.loss_type not in GATE_LOSS_TYPES:
            raise MoEGRPOError(f"`loss_type={self.loss_type!r}`: use one of {GATE_LOSS_TYPES}.")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.epsilon <= 0 or self.epsilon_high <= 0:
            raise MoEGRPOError(f"Clipping ranges must be positive, got epsilon={self.epsilon}, {self.epsilon_high}.")
        if self.set_log_prob not in ("set", "ordered"):
            raise MoEGRPOError(f"`set_log_prob={self.set_log_prob!r}`: use 'set' or 'ordered'.")
        if self.gate_loss_tokens not in ("all", "patches"):
            raise MoEGRPOError(f"`gate_loss_tokens={self.gate_loss_tokens!r}`: use 'all' or 'patches'.")


@dataclass
class CLIPDetFTConfig(CLIPClassificationConfig):
    r"""
    Configuration of [`CLIPDetFTTrainer`]: every parameter of [`CLIPClassificationConfig`], plus the ones below
    (the names, defaults and checks of `MoESFTConfig`'s).

    Parameters:
        train_routing (`str`, *optional*, defaults to `"topk"`):
            Routing of the training forward, as `MoESFTConfig.train_routing`: `"topk"` is Det-FT (the stock top-K);
            `"sample"`, `"noise"`, `"expert_choice"` and `"sinkhorn"` are the other fine-tuning routings. Evaluation
            always uses top-K.
        routing_noise_std (`float` or `None`, *optional*, defaults to `None`):
            Standard deviation of the router-logit noise of `train_routing="noise"`; `None`: `1 / num_experts`
            (V-MoE).
        noisy_mixing_weights (`bool`, *optional*, defaults to `True`):
            Under `train_routing="noise"`, mix the chosen experts with the noisy logits' weights (V-MoE's noisy
            softmax); `False` uses the noise-free weights.
        expert_capacity_factor (`float`, *optional*, defaults to `1.0`):
            Capacity factor of `train_routing="expert_choice"`: each expert takes
            `ceil(expert_capacity_factor * tokens * top_k / num_experts)` of a layer's tokens.
        sinkhorn_iterations (`int`, *optional*, defaults to `3`):
            Sinkhorn iterations of `train_routing="sinkhorn"` (each normalizes tokens, then experts).
    """

    train_routing: Literal["topk", "sample", "noise", "expert_choice", "sinkhorn"] = field(
        default="topk",
        metadata={
            "help": "Routing of the training forward: 'topk' (Det-FT), 'sample', 'noise', 'expert_choice', "
            "'sinkhorn'. Evaluation uses top-K."
        },
    )
    routing_noise_std: float | None = field(
        default=None,
        metadata={"help": "Standard deviation of the router-logit noise of train_routing='noise' (None: 1/E, V-MoE)."},
    )
    noisy_mixing_weights: bool = field(
        default=True,
        metadata={"help": "Under train_routing='noise', mix with the noisy logits' weights (V-MoE's noisy softmax)."},
    )
    expert_capacity_factor: float = field(
        default=1.0,
        metadata={
            "help": "Capacity factor of train_routing='expert_choice': each expert takes "
            "ceil(factor * tokens * top_k / num_experts) tokens per layer."
        },
    )
    sinkhorn_iterations: int = field(
        default=3,
        metadata={"help": "Sinkhorn iterations of train_routing='sinkhorn'."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_training_routing_options(self)
