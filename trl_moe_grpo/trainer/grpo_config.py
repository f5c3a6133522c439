"""`MoEGRPOConfig`: TRL's `GRPOConfig` plus the options of MoE-GRPO."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from trl import GRPOConfig

from ..errors import MoEGRPOError
from ..losses import GATE_LOSS_TYPES
from ..vllm_routing.options import check_vllm_generation_options
from .options import check_router_options


@dataclass
class MoEGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`MoEGRPOTrainer`]: every parameter of `trl.GRPOConfig`, plus the ones below.

    Parameters:
        > Parameters that control the rollouts' routing

        rollout_routing (`str`, *optional*, defaults to `"sample"`):
            How the routers choose experts while generating rollouts. `"sample"`: draw K experts per token and layer
            without replacement from the gate probabilities (MoE-GRPO). `"topk"`: the stock top-K. `"noise"`: Gaussian
            noise of std `routing_noise_std` on the gate log-scores, then top-K. Evaluation and inference always use
            top-K.
        routing_noise_std (`float`, *optional*, defaults to `1.0`):
            Standard deviation of the noise of `rollout_routing="noise"`.
        greedy_decoding (`bool` or `None`, *optional*, defaults to `None`):
            Decode the rollouts' tokens greedily. `None`: greedy when the routing is sampled (`"sample"`, `"noise"`),
            so rollouts differ only through routing as in the paper; sampled with `temperature` etc. under `"topk"`.
        rollout_routing_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature `T` of the routing of `rollout_routing="sample"`: rollouts draw from `softmax((z + m) / T)`
            (the selection distribution `p` raised to `1 / T` and renormalized), and Gate-GRPO scores the chosen sets
            under the same tempered law for the current and the behaviour policy, so its ratio stays exact and is 1
            on-policy. `T > 1` spreads the draws over more experts (more reward spread within a group), `T < 1`
            concentrates them on the top-K. `1.0` is the paper's sampling. Evaluation and inference use top-K.

        > Parameters that control replay and the routing losses

        routing_replay (`bool`, *optional*, defaults to `True`):
            Compute the training log-probabilities with each rollout's recorded routing replayed. `False` is the
            "no replay" ablation: the training forward uses the live top-K.
        token_loss_coef (`float`, *optional*, defaults to `1.0`):
            Weight of the Token-GRPO term (TRL's token loss, under replay). `0` trains the routing alone: the
            "gate-only" ablation.
        gate_loss_coef (`float`, *optional*, defaults to `1.0`):
            Weight of the Gate-GRPO term: TRL's clipped objective applied to the probability each layer's gate gives
            to the expert set that was chosen. `0` turns it off.
        gate_loss_positions (`str`, *optional*, defaults to `"all"`):
            Which tokens' routing the Gate-GRPO term trains: `"all"` non-padding tokens, prompt and completion, or
            only the `"completion"` tokens (the paper's literal sum). With greedy decoding and short answers, the
            routing that decides the answer is the prompt's, which only `"all"` trains.
        gate_set_logprob (`str`, *optional*, defaults to `"set"`):
            Probability of the chosen experts scored by Gate-GRPO: `"set"`, the exact probability of the unordered
            set under sampling without replacement (top_k <= 4; larger top_k falls back to the order), or
            `"ordered"`, the probability of the recorded draw order.
        router_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Peak learning rate of the router weights, shaped by the same scheduler as `learning_rate`. `None` uses
            `learning_rate`. Upcycled routers start near zero, so at RL learning rates their routing barely moves in
            a short run; a larger router learning rate lets it.
        router_warmup_steps (`int`, *optional*, defaults to `0`):
            Linear warm-up of the routers' learning rate over this many optimizer steps (factor `step /
            router_warmup_steps`, as transformers' linear warm-up), on top of the main scheduler, which keeps shaping
            every learning rate (its own `warmup_steps` included). Adam's first steps move each weight by about the
            learning rate whatever the gradient's size, which is noise until a signal accumulates. `0`: no warm-up of
            their own. Needs a `LambdaLR`-based `lr_scheduler_type` (all of transformers' but
            `reduce_lr_on_plateau`).

        > Parameters that give the routing rewards a learning signal

        zero_spread_groups (`str`, *optional*, defaults to `"keep"`):
            What the losses do with the rows of groups whose G rewards are all equal (zero advantage: no policy
            gradient). `"keep"`: TRL's behaviour, they count in the token and gate losses' normalizers and dilute the
            useful gradient by the share of dead groups. `"exclude_from_normalizer"`: the normalizers of the token and
            Gate-GRPO losses count only rows of groups with reward spread (rows for `grpo`, `sapo`, `dr_grpo`,
            `luspo`; tokens or positions for `bnpo`, `dapo`, `cispo`, `vespo`), and the dead rows' advantages are set
            to exactly 0 (TRL's are not when the rewards differ by less than its closeness test): the loss is then
            the loss of the live rows alone. The balance loss and the entropy bonus are unchanged (`docs/design.md`
            §11).
        regenerate_zero_spread_groups (`int`, *optional*, defaults to `0`):
            Regenerate the groups whose rewards are all equal up to this many times before training on the batch
            (DAPO's dynamic sampling, on the same prompts): each attempt regenerates the whole generation batch and a
            dead group takes the rollouts (routing traces included) of the first attempt in which it has reward
            spread; groups that stay dead keep their first rollouts. Training only; costs up to this many extra
            generations and reward evaluations per generation batch.
        router_entropy_coef (`float`, *optional*, defaults to `0.0`):
            Weight of an entropy bonus on the routers' selection distributions (masked as the sampler masked them,
            untempered), averaged over layers and over the Gate-GRPO positions with the normalization of
            `loss_type`: `loss -= router_entropy_coef * entropy`. RL tends to collapse the routing entropy; the
            paper reports it rising.

        > Parameters that control modality-aware router guidance (vision-language models)

        modality_mask_ratio (`float`, *optional*, defaults to `0.25`):
            Share `P` of experts removed, per layer, from each modality's sampling distribution: the `floor(P * N)`
            experts that modality uses least under top-K routing (never leaving fewer than top_k). `0` samples from
            every expert (the modality-agnostic "multi." ablation). Text-only models have no vision tokens: guidance
            is off.
        modality_stats_path (`str` or `None`, *optional*, defaults to `None`):
            Modality statistics file written by `trl-moe-grpo calibrate`. When `None`, the trainer calibrates on the
            first `modality_calibration_samples` training prompts before step 1 and saves the file in `output_dir`.
        modality_calibration_samples (`int`, *optional*, defaults to `256`):
            Number of training prompts the trainer's own calibration pass uses.

        > Parameters that control evaluation

        greedy_eval (`bool`, *optional*, defaults to `True`):
            Decode evaluation completions greedily, as at inference (evaluation always routes with top-K). `False`
            samples them with the training `temperature`, as `trl.GRPOTrainer` evaluates.
        task_column (`str` or `None`, *optional*, defaults to `"task"`):
            Dataset column naming each row's task. When the evaluation dataset has it, evaluation logs the mean reward
            per task (`eval_reward_by_task/<task>`) and the task-wise JSD of the expert selections
            (`eval_routing/task_jsd`). `None` treats every row as one task.

    The load-balancing loss (`router_aux_loss_coef`, inherited) is computed on the experts the tokens were routed to,
    per layer, with the expert load of the whole generation batch, so gradient accumulation does not change it (see
    [`MoEGRPOTrainer`] for how it differs from transformers' auxiliary loss). Under `mask_truncated_completions=True`,
    truncated rollouts are left out of Gate-GRPO entirely, prompt included.

    With `use_vllm=True` (`vllm_mode="colocate"`, text-only MoE models, the vLLM versions of `docs/vllm.md`), the
    rollouts' routing is sampled and recorded inside vLLM with the same laws, and replayed in training as above.

    > [!NOTE]
    > These defaults restate the paper's setting: `num_generations=8` and no KL term (`beta=0.0`).
    """

    num_generations: int | None = field(
        default=8,
        metadata={"help": "Number of rollouts per prompt (G)."},
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "KL coefficient. MoE-GRPO uses no reference model by default (0.0)."},
    )

    rollout_routing: Literal["sample", "topk", "noise"] = field(
        default="sample",
        metadata={
            "help": "How routers choose experts during rollouts: 'sample' (without replacement from the gate "
            "probabilities), 'topk' (stock) or 'noise' (Gaussian noise on the gate log-scores, then top-K)."
        },
    )
    routing_noise_std: float = field(
        default=1.0,
        metadata={"help": "Standard deviation of the gate noise of rollout_routing='noise'."},
    )
    greedy_decoding: bool | None = field(
        default=None,
        metadata={
            "help": "Decode rollout tokens greedily. None: greedy when the routing is sampled ('sample', 'noise'), "
            "sampled under 'topk'."
        },
    )
    routing_replay: bool = field(
        default=True,
        metadata={"help": "Replay each rollout's recorded routing when computing training log-probabilities."},
    )
    token_loss_coef: float = field(
        default=1.0,
        metadata={"help": "Weight of the Token-GRPO term (0 trains the routing alone: the gate-only ablation)."},
    )
    gate_loss_coef: float = field(
        default=1.0,
        metadata={"help": "Weight of the Gate-GRPO term (0 turns it off)."},
    )
    gate_loss_positions: Literal["all", "completion"] = field(
        default="all",
        metadata={"help": "Tokens whose routing Gate-GRPO trains: 'all' non-padding tokens or 'completion' only."},
    )
    gate_set_logprob: Literal["set", "ordered"] = field(
        default="set",
        metadata={"help": "Score the chosen experts as an unordered 'set' (exact, top_k <= 4) or in drawn 'ordered'."},
    )
    router_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the router weights (None: learning_rate)."},
    )
    router_warmup_steps: int = field(
        default=0,
        metadata={"help": "Linear warm-up of the routers' learning rate over this many steps (0: none of their own)."},
    )
    rollout_routing_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature of sampled rollout routing: draw from softmax((z + m) / T); Gate-GRPO scores sets "
            "under the same tempered law (1.0: the paper's)."
        },
    )
    zero_spread_groups: Literal["keep", "exclude_from_normalizer"] = field(
        default="keep",
        metadata={
            "help": "Rows of groups whose rewards are all equal: 'keep' them in the loss normalizers (TRL) or "
            "'exclude_from_normalizer'."
        },
    )
    regenerate_zero_spread_groups: int = field(
        default=0,
        metadata={"help": "Regenerate groups whose rewards are all equal, up to N times (DAPO's dynamic sampling)."},
    )
    router_entropy_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of an entropy bonus on the routers' selection distributions (0: off)."},
    )

    modality_mask_ratio: float = field(
        default=0.25,
        metadata={"help": "Share of experts masked per layer from each modality's sampling distribution (0 = off)."},
    )
    modality_stats_path: str | None = field(
        default=None,
        metadata={"help": "Modality statistics file from `trl-moe-grpo calibrate`; None calibrates before step 1."},
    )
    modality_calibration_samples: int = field(
        default=256,
        metadata={"help": "Training prompts used by the trainer's own calibration pass."},
    )
    greedy_eval: bool = field(
        default=True,
        metadata={"help": "Decode evaluation completions greedily (as at inference); False samples as TRL does."},
    )
    task_column: str | None = field(
        default="task",
        metadata={"help": "Dataset column naming each row's task: evaluation logs reward and routing per task."},
    )

    def __post_init__(self):
        super().__post_init__()
        choices = {
            "rollout_routing": ("sample", "topk", "noise"),
            "gate_loss_positions": ("all", "completion"),
            "gate_set_logprob": ("set", "ordered"),
            "zero_spread_groups": ("keep", "exclude_from_normalizer"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MoEGRPOError(f"`{name}={getattr(self, name)!r}` is not one of {allowed}.")
        if self.routing_noise_std <= 0:
            raise MoEGRPOError(f"`routing_noise_std` must be positive, got {self.routing_noise_std}.")
        if not 0 <= self.modality_mask_ratio < 1:
            raise MoEGRPOError(f"`modality_mask_ratio` must be in [0, 1), got {self.modality_mask_ratio}.")
        if self.modality_calibration_samples < 1:
            raise MoEGRPOError(
                f"`modality_calibration_samples` must be at least 1, got {self.modality_calibration_samples}."
            )
        for name in ("token_loss_coef", "gate_loss_coef"):
            if getattr(self, name) < 0:
                raise MoEGRPOError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        check_router_options(self)
        if self.token_loss_coef == 0 and self.gate_loss_coef == 0:
            raise MoEGRPOError("`token_loss_coef` and `gate_loss_coef` are both 0: nothing would be trained.")
        self._check_reward_signal_options()
        if self.gate_loss_coef > 0 and self.loss_type not in GATE_LOSS_TYPES:
            raise MoEGRPOError(
                f"Gate-GRPO supports loss_type in {GATE_LOSS_TYPES}, got {self.loss_type!r}. Choose one of those, or "
                "set `gate_loss_coef=0` to train only the tokens."
            )
        if self.gate_loss_coef > 0 and self.importance_sampling_level != "token":
            raise MoEGRPOError(
                "Gate-GRPO weighs each (token, layer) routing decision on its own and needs "
                "`importance_sampling_level='token'`; set it, or `gate_loss_coef=0`."
            )
        if self.use_vllm:  # vLLM rollouts sample and record the routes inside the engine (docs/vllm.md)
            check_vllm_generation_options(self.vllm_mode, self.vllm_tensor_parallel_size, self.vllm_enable_sleep_mode)
        if self.use_transformers_continuous_batching:
            raise MoEGRPOError(
                "Continuous-batching (paged) generation packs sequences in a way routing traces cannot follow yet. "
                "Set `use_transformers_continuous_batching=False`."
            )
        if self.greedy_decoding is None:
            self.greedy_decoding = self.rollout_routing != "topk"

    def _check_reward_signal_options(self) -> None:
        """The options that give routing rewards signal (`rollout_routing_temperature`, `zero_spread_groups`...)."""
        temperature = self.rollout_routing_temperature
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise MoEGRPOError(f"`rollout_routing_temperature` must be a positive number, got {temperature!r}.")
        if temperature != 1.0 and self.rollout_routing != "sample":
            raise MoEGRPOError(
                f"`rollout_routing_temperature={temperature}` tempers sampled routing, but `rollout_routing="
                f"{self.rollout_routing!r}` draws nothing from the gates' law (use `routing_noise_std` for 'noise'). "
                "Set `rollout_routing='sample'`, or leave the temperature at 1.0."
            )
        if temperature != 1.0 and self.use_vllm:
            raise MoEGRPOError(
                "`rollout_routing_temperature` is not implemented for vLLM rollouts, which sample routes inside the "
                "engine at temperature 1. Leave it at 1.0 with `use_vllm=True`, or generate with transformers."
            )
        for name in ("regenerate_zero_spread_groups", "router_warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MoEGRPOError(f"`{name}` must be an integer >= 0, got {value!r}.")
        if self.router_warmup_steps and self.lr_scheduler_type == "reduce_lr_on_plateau":
            raise MoEGRPOError(
                "`router_warmup_steps` scales the routers' factor of the learning-rate schedule, which "
                "`lr_scheduler_type='reduce_lr_on_plateau'` does not have. Choose another scheduler, or set "
                "`router_warmup_steps=0`."
            )
        if self.regenerate_zero_spread_groups and self.num_generations is not None and self.num_generations < 2:
            raise MoEGRPOError(
                "`regenerate_zero_spread_groups` needs groups of at least 2 rollouts (`num_generations >= 2`): a "
                "group of one never has reward spread."
            )
        if self.router_entropy_coef < 0:
            raise MoEGRPOError(
                f"`router_entropy_coef` must be >= 0 (a bonus on the routing entropy), got {self.router_entropy_coef}."
            )
        if self.router_entropy_coef > 0 and self.loss_type not in GATE_LOSS_TYPES:
            raise MoEGRPOError(
                f"The router entropy bonus is normalized like Gate-GRPO, for loss_type in {GATE_LOSS_TYPES}, got "
                f"{self.loss_type!r}. Choose one of those, or set `router_entropy_coef=0`."
            )
