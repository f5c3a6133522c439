"""`MoEGRPOConfig`: TRL's `GRPOConfig` plus the options of MoE-GRPO."""

from __future__ import annotations

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
