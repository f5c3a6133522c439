"""`MoEGRPOTrainer`: TRL's `GRPOTrainer` with sampled routing, routing replay, Token-GRPO and Gate-GRPO.

A rollout's routing trace, from generation to the loss (`docs/design.md` §4). TRL's method signatures leave it no
argument to travel in, so it goes through one named hand-off, `self._replay` (a `ReplayState`, `replay_state.py`),
and through TRL's batch dict. Each override is the narrowest TRL method that does the job, and calls `super()`:

1. `_generate_and_score_completions` opens a generation batch: `_replay.begin_generation()`.
2. `_generate_single_turn` runs TRL's generation inside `_rollout(self._active_routing())`: the routing controller's
   `rollout(...)` on the transformers path, `MoEVLLMGeneration.rollout(...)` with `use_vllm=True` (routes sampled and
   recorded inside vLLM, `docs/vllm.md`); both yield what they recorded. `_active_routing()` (an `ActiveRouting`) is
   the one rule for which routing is active now: `rollout_routing` in training, the stock top-K (and greedy decoding
   under `greedy_eval`) in evaluation. The recorded routes become a trace laid out like TRL's token ids:
   `_replay.set_trace(...)`.
3. Every forward TRL then runs (`_get_per_token_logps_and_entropies`) replays `_replay.trace_to_replay()`. The
   policy's forward here is TRL's old-log-prob pass (run only when generations are reused): its captures score the
   old gate log-probs, `_replay.keep_old_gate_logps(...)`. The reference forward (`ref_model`, or a PEFT model with
   its adapters disabled or its "ref" adapter active) keeps nothing, whatever order TRL runs the forwards in.
4. Back in `_generate_and_score_completions`, `_replay.end_generation()` hands the trace to the batch dict as
   `routed_experts`, and `_replay.take_old_gate_logps()` the old gate log-probs as `old_gate_logps`: TRL's buffering,
   shuffling and micro-batch splitting keep them aligned with their rows.
5. `_compute_loss`, per micro-batch: `_replay.begin_loss(inputs["routed_experts"])`, then TRL's token loss, whose
   policy forward replays that trace (Token-GRPO is TRL's own loss under replay) and leaves its captures
   (`_replay.keep_policy_captures(...)`); `_replay.take_policy_captures()` gives them to Gate-GRPO and the
   load-balancing loss on the routed sets.
6. `training_step` / `prediction_step` bound all of it to the step, backward (checkpoint recompute) included:
   `_routing_step()` ends the controllers' replay state and calls `_replay.end_step()`, which forgets the rest.

Also overridden: `create_optimizer` and `create_scheduler` (an optional learning rate of the routers' own,
`router_learning_rate`, and its warm-up, `router_warmup_steps`), `evaluation_loop` (the routing measures of the whole
evaluation set), `_calculate_rewards` and `_generate` (the within-group reward spread, `routing/reward_spread_share`,
and per-task rewards as metrics; what the levers of `docs/design.md` §11 need: zero-spread groups out of the
normalizers, or generated again), `train` and `_save` (modality guidance, the routing options saved with
checkpoints).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import textwrap
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils import gather_object, is_peft_model
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging
from trl import GRPOTrainer
from trl.chat_template_utils import parse_response
from trl.data_utils import is_conversational
from trl.trainer.utils import nanstd

from ..analysis.measures import differs_from_top_k, expert_utilization, gate_entropy
from ..analysis.routing import RoutingAnalysis
from ..errors import MoEGRPOError
from ..guidance import ModalityStatistics, calibrate
from ..losses import balance_loss_given_load, clipped_objective, expert_load, reduce_like_trl, set_log_prob
from ..routing import RolloutRecording, RoutingController, pad_routes, split_rollout_routes
from ..routing.controller import LayerCapture
from ..routing.introspection import model_identity, vision_token_ids
from ..routing.sampling import tempered_log_probs
from ..routing.traces import unpad_routes
from ..vllm_routing.options import refuse_vision_language_model
from ..zero3 import gathered_parameters
from .common import MoETrainerMixin, peft_config_training_routers, repair_backbone_lookup, resolve_args
from .eval_routing import EvalRoutingCollector
from .grpo_config import MoEGRPOConfig
from .replay_state import ActiveRouting, ReplayState

logger = logging.get_logger(__name__)

STATS_FILE = "modality_statistics.json"
ROUTING_FILE = "moe_grpo_routing.json"
# Saved with every checkpoint and final model, compared on resume.
ROUTING_OPTIONS = (
    "rollout_routing",
    "routing_noise_std",
    "greedy_decoding",
    "routing_replay",
    "token_loss_coef",
    "gate_loss_coef",
    "gate_loss_positions",
    "gate_set_logprob",
    "modality_mask_ratio",
    "rollout_routing_temperature",
    "zero_spread_groups",
    "regenerate_zero_spread_groups",
    "router_entropy_coef",
    "router_warmup_steps",
)


class MoEGRPOTrainer(MoETrainerMixin, GRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` that trains the expert routing of MoE models with MoE-GRPO.

    It takes the same arguments as `GRPOTrainer` (model, reward functions, datasets, PEFT config, callbacks...) and an
    [`MoEGRPOConfig`].

    **Rollout routing replay (R3).** With `rollout_routing="topk"` and `gate_loss_coef=0` it is plain GRPO with the
    training forward routing every token as the rollout did. With `router_aux_loss_coef=0` as well, its loss and
    gradients are `trl.GRPOTrainer`'s (tested to 1e-6 in fp32). A non-zero balance coefficient (the config's, else the
    model's `router_aux_loss_coef`) replaces TRL's MoE auxiliary loss with this trainer's load-balancing loss, which
    differs from transformers' `load_balancing_loss_func` by design:

    - it is computed per MoE layer, then averaged (transformers pools the layers' loads and probabilities first; the
      two agree for a model with one MoE layer);
    - the expert load `f` counts the recorded routes of the whole generation batch (all processes), not of one
      forward, and the mean probabilities are normalized by that batch's token count as TRL normalizes `dapo`: the
      loss of an accumulation window is the sum of its micro-batches' losses, so gradient accumulation does not change
      it (TRL's auxiliary loss averages per-micro-batch losses instead);
    - it counts the tokens with a recorded route: every non-padding token except each rollout's last completion token,
      which generation never feeds back to the model (its routing influences no scored log-probability).

    **PEFT.** LoRA's `target_modules` cannot reach transformers' routers (they are not `nn.Linear` layers), so with a
    `LoraConfig` as `peft_config` the trainer adds the routers' weights to the config's `target_parameters`: each
    router trains through a LoRA update of the adapter's rank, saved with the adapter (a copy of the config is
    changed, not yours). Routers listed in `modules_to_save` are refused (PEFT would keep two copies of each
    router). With another PEFT method, or a `PeftModel` whose adapter leaves every router frozen, a non-zero
    `gate_loss_coef` is an error: Gate-GRPO would train nothing. The reference model of `beta > 0` is the model with
    its adapters disabled, as in TRL.

    **Truncated completions.** With `mask_truncated_completions=True`, TRL zeroes a truncated rollout's completion
    mask; Gate-GRPO and its metrics then leave out the whole row, prompt included (its advantage would otherwise train
    the prompt's routing). The balance loss keeps the tokens TRL's forward attends to (the prompt), since it weighs no
    advantage.

    The model's `output_router_logits` is switched off while training (the routing hooks compute the balance loss);
    saved models keep the value the model came with.
    """

    _tag_names = ["trl", "grpo", "moe-grpo"]
    _name = "MoE-GRPO"
    # No arXiv id is known for the paper: TRL's model card then cites it without a paper link.
    _paper = {
        "title": "MoE-GRPO: Optimizing Mixture-of-Experts via Reinforcement Learning in Vision-Language Models",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @misc{moe_grpo_2026,
                title        = {{MoE-GRPO: Optimizing Mixture-of-Experts via Reinforcement Learning in
                                 Vision-Language Models}},
                year         = 2026,
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: MoEGRPOConfig | None = None, *pargs, **kwargs):
        args = resolve_args(model, args, MoEGRPOConfig, "MoEGRPOTrainer", "MoE-GRPO")
        for unsupported in ("tools", "rollout_func", "environment_factory"):
            if kwargs.get(unsupported) is not None:
                raise MoEGRPOError(
                    f"`{unsupported}` is not supported by MoEGRPOTrainer yet: multi-turn and custom rollouts bypass "
                    "the routing trace of each generated token. Use single-turn prompts."
                )
        if kwargs.get("peft_config") is not None:
            kwargs["peft_config"] = peft_config_training_routers(kwargs["peft_config"], model, args)
        building = contextlib.nullcontext()
        if args.use_vllm:  # TRL builds the engine in its __init__: ours samples and records routes (docs/vllm.md)
            from ..vllm_routing.generation import routed_vllm_generation

            refuse_vision_language_model(model)
            building = routed_vllm_generation()
        with building:
            super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        for scored in (self.model, getattr(self, "ref_model", None)):  # the models TRL's fused LM head scores with
            if scored is not None:
                repair_backbone_lookup(scored.get_base_model() if is_peft_model(scored) else scored)
        self._refuse_reentrant_checkpointing()
        if self._is_vlm and self._tokenizer.padding_side != "left":
            # TRL left-pads the prompt ids itself but re-runs the processor for the training forward's per-token
            # fields (`mm_token_type_ids`, `token_type_ids`): padded on the other side they would misplace every
            # image's positions (Qwen-VL's M-RoPE) and replay would no longer reproduce the rollout.
            logger.warning("Setting the processor's tokenizer to left padding, as TRL's prompts are left-padded.")
            self._tokenizer.padding_side = "left"

        policy = self.routing_model
        self.routing = RoutingController(policy, vision_token_ids=vision_token_ids(policy))
        self.modality_statistics: ModalityStatistics | None = None
        self.ref_routing = None
        if self.ref_model is not None:
            self.ref_routing = RoutingController(self.ref_model, vision_token_ids=vision_token_ids(self.ref_model))

        self._take_over_balance_loss(policy, self.ref_model)
        if args.gate_loss_coef > 0 and not self.router_trainable_parameters():
            raise MoEGRPOError(
                "No router parameter is trainable, so Gate-GRPO would train nothing. Under PEFT, pass a `LoraConfig` "
                "as `peft_config` (the trainer adds the routers' weights to its `target_parameters`), or add them to "
                "your adapter's `target_parameters` yourself (e.g. `['mlp.gate.weight']`); otherwise unfreeze the "
                "routers, or set `gate_loss_coef=0`."
            )

        if not args.use_vllm:  # vLLM decodes greedily through `MoEVLLMGeneration.rollout(greedy=True)` instead
            self._greedy_decoding = self._greedy(self.generation_config, self.generation_kwargs)
            if args.greedy_decoding:
                self.generation_config, self.generation_kwargs = self._greedy_decoding

        # The rollout trace's hand-off between TRL's methods, and what the replayed forwards hand back (by role).
        self._replay = ReplayState()
        self._eval_routing: EvalRoutingCollector | None = None  # open while `evaluation_loop` runs
        # Dynamic sampling (`regenerate_zero_spread_groups`): the rows and prompts being generated, a re-entry guard,
        # and per row of the last training batch the attempt its rollout came from (0: the first generation).
        self._rollout_rows: list[dict] | None = None
        self._rollout_prompts: list | None = None
        self._regenerating = False
        self.last_regeneration_attempts: torch.Tensor | None = None
        self._reward_spread_rows: torch.Tensor | None = None  # per row of the last scored batch, all processes
        # The routing measures of the last `evaluate()` (expert counts per sequence, by task), for reports.
        self.last_eval_routing: RoutingAnalysis | None = None

    # ------------------------------------------------------------------ modality-aware guidance, checkpoints

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        checkpoint = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else None
        checkpoint = checkpoint or (resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None)
        if checkpoint is not None:
            self._warn_on_changed_routing_options(checkpoint)
        self._setup_modality_guidance(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _setup_modality_guidance(self, checkpoint: str | None) -> None:
        """Load or measure the modality statistics and give the sampler its expert masks, before step 1.

        Sources, first found wins: the checkpoint being resumed, `modality_stats_path`, a calibration pass.
        """
        args = self.args
        if args.rollout_routing == "topk" or args.modality_mask_ratio == 0:
            return  # top-K rollouts draw nothing; ratio 0 is the modality-agnostic ablation
        model = self.routing_model
        if self.routing.vision_token_ids.numel() == 0:
            logger.warning(
                f"Modality-aware router guidance is off: `{type(model).__name__}` has no vision tokens (text-only "
                "model), so rollouts sample from every expert."
            )
            return
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, STATS_FILE)):
            source = os.path.join(checkpoint, STATS_FILE)
            stats = ModalityStatistics.load(source)
        elif args.modality_stats_path is not None:
            source = args.modality_stats_path
            stats = ModalityStatistics.load(source)
        else:
            rows = list(itertools.islice(iter(self.train_dataset), args.modality_calibration_samples))
            # Before `train()` builds the DeepSpeed engine nothing gathers ZeRO-3-partitioned parameters: gather
            # them for this no-grad pass (every rank runs it on the same rows), as TRL does for generation.
            with gathered_parameters(model):
                stats = calibrate(model, self.routing, self.processing_class, rows, args.per_device_train_batch_size)
            source = f"a top-K calibration pass over {len(rows)} training prompts"
            if args.should_save:
                stats.save(os.path.join(args.output_dir, STATS_FILE), args.modality_mask_ratio)
        stats.check_model(model, self.routing)
        self.routing.set_expert_masks(stats.masks(args.modality_mask_ratio))
        self.modality_statistics = stats
        masked = (~self.routing.expert_masks[0]).sum(-1).tolist()
        logger.warning(
            f"Modality-aware router guidance from {source}: per layer, {masked[0]} of {self.routing.num_experts} "
            f"experts are masked for text tokens and {masked[1]} for vision tokens (P={args.modality_mask_ratio})."
        )

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        options = {name: getattr(self.args, name) for name in ROUTING_OPTIONS}
        with open(os.path.join(output_dir, ROUTING_FILE), "w") as f:
            json.dump(options, f, indent=1)
        if self.modality_statistics is not None:
            self.modality_statistics.save(os.path.join(output_dir, STATS_FILE), self.args.modality_mask_ratio)

    def _warn_on_changed_routing_options(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, ROUTING_FILE)
        if not os.path.isfile(path):
            return
        with open(path) as f:
            saved = json.load(f)
        changed = {k: (v, getattr(self.args, k)) for k, v in saved.items() if getattr(self.args, k, v) != v}
        if changed:
            logger.warning(
                "Resuming with routing options that differ from the checkpoint's: "
                + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            )

    # ------------------------------------------------------------------ rollouts: sampled routing, traced

    @staticmethod
    def _greedy(generation_config, generation_kwargs) -> tuple[Any, dict | None]:
        """Copies of TRL's generation settings that decode greedily."""
        greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None}
        config = copy.deepcopy(generation_config)
        if config is not None:
            config.update(**greedy)
        return config, None if generation_kwargs is None else {**generation_kwargs, **greedy}

    def _active_routing(self) -> ActiveRouting:
        """Which routing is active now: the rollouts' routing and decoding, and replay's dispatch (training or
        evaluation, by the model's mode)."""
        return ActiveRouting.now(self.args, self.model.training)

    @contextlib.contextmanager
    def _decoding(self, greedy: bool) -> Iterator[None]:
        """Greedy decoding while open when `greedy` (evaluation under `greedy_eval`); otherwise TRL's settings, which
        `__init__` made greedy under `greedy_decoding`."""
        if not greedy:
            yield
            return
        training = self.generation_config, self.generation_kwargs
        self.generation_config, self.generation_kwargs = self._greedy_decoding
        try:
            yield
        finally:
            self.generation_config, self.generation_kwargs = training

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self._regenerates_zero_spread_groups():  # DAPO's dynamic sampling (`regenerate_zero_spread_groups`)
            return self._generate_regenerating_zero_spread_groups(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        with self._rollout(self._active_routing()) as recording:
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        lengths = [len(ids) for ids in prompt_ids], [len(ids) for ids in completion_ids]
        # vLLM cut its routes by request already; transformers' recording holds one entry per model call.
        prompt_routes, completion_routes = (
            recording.split(*lengths) if self.use_vllm else split_rollout_routes(recording, *lengths)
        )
        self._replay.set_trace(
            pad_routes(prompt_routes, completion_routes, self.pad_to_multiple_of).to(self.accelerator.device)
        )
        return completion_ids, logprobs

    def _rollout(self, active: ActiveRouting) -> contextlib.AbstractContextManager:
        """Rollouts route and decode as `active` says while open, on the engine that generates them; the context
        yields what that engine recorded of their routes."""
        if self.use_vllm:  # sampled and recorded inside the engine (`vllm_routing/generation.py`, docs/vllm.md)
            return self.vllm_generation.rollout(active.rollout, active.noise_std, greedy=active.greedy)
        return self._transformers_rollout(active)

    @contextlib.contextmanager
    def _transformers_rollout(self, active: ActiveRouting) -> Iterator[RolloutRecording]:
        with (
            self.routing.rollout(active.rollout, active.noise_std, active.temperature) as recording,
            self._decoding(active.greedy),
        ):
            yield recording

    def _generate_and_score_completions(self, inputs):
        self._replay.begin_generation()
        if self._eval_routing is not None:
            self._eval_routing.add_rows(inputs)
        self._rollout_rows = inputs  # the rewards of regenerated groups need them (`regenerate_zero_spread_groups`)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            routes = self._replay.end_generation()
        old_gate_logps = self._replay.take_old_gate_logps()
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        if routes is None or routes.shape[:2] != input_ids.shape:
            raise MoEGRPOError(
                f"Routing trace {None if routes is None else tuple(routes.shape[:2])} does not match the batch's "
                f"token ids {tuple(input_ids.shape)}; was generation run through `_generate_single_turn`?"
            )
        output["routed_experts"] = routes
        if "old_per_token_logps" in output:
            # Generations are reused across optimizer steps: the sets are scored under the policy that drew them, by
            # the no-grad replayed forward TRL ran for its old token log-probs (`_get_per_token_logps_and_entropies`).
            if old_gate_logps is None:
                raise MoEGRPOError("TRL computed old log-probs, but no policy forward scored the old gate log-probs.")
            output["old_gate_logps"] = old_gate_logps
        gate_mask = self._gate_mask(routes, output["prompt_mask"], output["completion_mask"])
        output["num_gate_items_in_batch"] = self.accelerator.gather(gate_mask.sum()).sum()
        self._add_reward_spread(output)  # zero-spread groups (`zero_spread_groups`)
        if self.balance_loss_coef:
            output.update(self._generation_batch_load(routes, output["prompt_mask"], output["completion_mask"]))
        return output

    def _generation_batch_load(self, routes, prompt_mask, completion_mask) -> dict[str, torch.Tensor]:
        """The expert load of the balance loss, over the whole generation batch of every process (`docs/design.md` §5).

        `expert_load`: `[batch, layers, experts]`, every row holding the batch's routed slots per token (so TRL's
        shuffling and splitting hand each micro-batch the load of its whole batch); `num_balance_tokens_in_batch`:
        the tokens counted (non-padding, with a recorded route), over all processes.
        """
        batch = routes.shape[0]
        counted = self._balance_mask(routes, prompt_mask, completion_mask).reshape(-1)
        dispatched = routes.flatten(0, 1).transpose(0, 1)  # [layers, rows, top_k]
        load = expert_load(dispatched, counted, self.routing.num_experts)
        totals = torch.cat([load.reshape(-1), counted.sum().reshape(1).to(load.dtype)])
        totals = self.accelerator.reduce(totals, reduction="sum")
        tokens = totals[-1]
        fraction = totals[:-1].view_as(load) / tokens.clamp(min=1.0)
        return {"expert_load": fraction.expand(batch, *fraction.shape), "num_balance_tokens_in_batch": tokens}

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        self._reward_spread_rows = self._group_reward_spread(rewards_per_func, group).repeat_interleave(group)
        self._metrics[mode]["routing/reward_spread_share"].append(self._reward_spread_rows.float().mean().item())
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        if group > 1:
            # The learning signal of GRPO: if the G rollouts of a prompt agree, every advantage is zero.
            within = nanstd(rewards.view(-1, group), dim=1)
            self._metrics[mode]["reward_std_within_group"].append(torch.nanmean(within).item())
        column = self.args.task_column
        if mode == "eval" and column is not None and column in inputs[0]:
            # Every completion's reward, not a batch mean: the logged mean is then the task's exact mean.
            tasks = gather_object([str(row[column]) for row in inputs])
            for task, reward in zip(tasks, rewards.tolist()):
                self._metrics[mode][f"reward_by_task/{task}"].append(reward)
        return rewards_per_func

    # ------------------------------------------------------------------ levers that give routing rewards signal

    @torch.no_grad()
    def _group_reward_spread(self, rewards_per_func: torch.Tensor, group: int) -> torch.Tensor:
        """`[groups]` bool: whether the G rewards of a group differ, which is what gives its rollouts an advantage.

        The rewards are the ones TRL's advantages start from: the weighted sum over reward functions, unscorable rows
        (every function returned None) left out. A group has spread when the std of its scorable rewards is not close
        to 0, TRL's own test for `frac_reward_zero_std`; a group of one, or with fewer than two scorable rollouts,
        has none.
        """
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        if group < 2:
            return torch.zeros(rewards.numel() // max(group, 1), dtype=torch.bool, device=rewards.device)
        std = nanstd(rewards.view(-1, group), dim=1)
        return ~torch.isclose(std, torch.zeros_like(std)) & ~torch.isnan(std)

    def _add_reward_spread(self, output: dict[str, Any]) -> None:
        """Under `zero_spread_groups="exclude_from_normalizer"`, the batch learns which rows have reward spread.

        Adds `reward_spread` (`[batch]` bool, this process's rows, so TRL's shuffling and splitting keep it aligned),
        and the generation batch's counts of live loss items over every process (`num_live_items_in_batch`,
        `num_live_gate_items_in_batch`), and sets the dead rows' advantages to exactly 0: TRL's are not, when the
        rewards differ by less than its closeness test (their difference divided by `std + 1e-4`).
        """
        if self.args.zero_spread_groups == "keep":
            return
        rows = output["prompt_ids"].size(0)
        start = self.accelerator.process_index * rows  # TRL's own slice of the gathered rewards
        live = self._reward_spread_rows[start : start + rows].to(output["advantages"].device)
        output["reward_spread"] = live
        output["advantages"] = torch.where(live, output["advantages"], torch.zeros_like(output["advantages"]))
        loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
        output["num_live_items_in_batch"] = self.accelerator.gather((loss_mask * live[:, None]).sum()).sum()
        gate_mask = self._gate_mask(output["routed_experts"], output["prompt_mask"], output["completion_mask"])
        output["num_live_gate_items_in_batch"] = self.accelerator.gather((gate_mask & live[:, None]).sum()).sum()

    def _zero_spread_factor(
        self, inputs: dict[str, Any], loss: str, gate_mask: torch.Tensor | None = None
    ) -> torch.Tensor | float:
        """The factor that turns the normalizer of the token (`loss="token"`) or Gate-GRPO (`"gate"`) loss into one
        counting only rows of groups with reward spread; 1.0 under `zero_spread_groups="keep"`.

        Each normalization TRL uses divides a masked sum by a count: rows of the micro-batch (`grpo`, `sapo`,
        `dr_grpo`, `luspo`), its masked items (`bnpo`), or the generation batch's masked items (`dapo`, `cispo`,
        `vespo`). The dead rows' terms in the sum are 0 (advantage 0; with `beta > 0` their KL terms stay), so
        multiplying by count / live count gives the sum divided by the live count (at least 1, as TRL clamps).
        """
        if self.args.zero_spread_groups == "keep":
            return 1.0
        live = inputs["reward_spread"]
        if loss == "token":
            mask, items = inputs["completion_mask"] * inputs.get("tool_mask", 1), "items_in_batch"
        else:
            mask, items = gate_mask, "gate_items_in_batch"
        if self.loss_type in ("grpo", "sapo", "dr_grpo", "luspo"):
            total, kept = live.numel(), live.sum()
        elif self.loss_type == "bnpo":
            total, kept = mask.sum(), (mask * live[:, None]).sum()
        elif self.loss_type in ("dapo", "cispo", "vespo"):
            total, kept = inputs[f"num_{items}"], inputs[f"num_live_{items}"]
        else:
            raise MoEGRPOError(
                f"`zero_spread_groups='exclude_from_normalizer'` does not know TRL's normalizer of loss_type="
                f"{self.loss_type!r}. Use `zero_spread_groups='keep'`."
            )
        total = torch.as_tensor(total, dtype=torch.float32, device=live.device).clamp(min=1.0)
        return total / torch.as_tensor(kept, dtype=torch.float32, device=live.device).clamp(min=1.0)

    def _generate(self, prompts: list):
        self._rollout_prompts = prompts  # what TRL hands the reward functions (`regenerate_zero_spread_groups`)
        return super()._generate(prompts)

    def _regenerates_zero_spread_groups(self) -> bool:
        return bool(self.args.regenerate_zero_spread_groups) and self.model.training and not self._regenerating

    def _generate_regenerating_zero_spread_groups(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        """`_generate_single_turn`, with the groups whose rewards are all equal generated again, up to
        `regenerate_zero_spread_groups` times (DAPO's dynamic sampling, on the same prompts).

        Each attempt generates the whole batch (every process the same number of times, since the decision comes from
        the rewards gathered over all processes), scores it with the reward functions, and gives each still-dead group
        the rollouts of its first attempt with spread: completion ids, log-probs and the routing trace of every row
        travel together, cut out of their attempt's trace and padded again like TRL's token ids. TRL then scores the
        final rollouts as usual (the reward functions run once more on them; what they log during the attempts is
        dropped). Per row, the attempt its rollout came from is kept in `last_regeneration_attempts`.
        """
        rows, prompts = self._rollout_rows, self._rollout_prompts
        if rows is None or prompts is None or len(rows) != len(prompt_ids):
            raise MoEGRPOError("Regenerating zero-spread groups needs the batch's rows: generate through TRL's loop.")
        group = self.num_generations
        start = self.accelerator.process_index * len(prompt_ids)
        groups = torch.arange(start, start + len(prompt_ids)) // group  # each local row's group over all processes
        self._regenerating = True
        try:
            completion_ids, logprobs, prompt_routes, completion_routes, spread = self._scored_attempt(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images, rows, prompts, group
            )
            first_share = spread.float().mean().item()
            attempt_of_row = torch.zeros(len(prompt_ids), dtype=torch.long)
            attempts = 0
            while attempts < self.args.regenerate_zero_spread_groups and not bool(spread.all()):
                attempts += 1
                attempt = self._scored_attempt(
                    prompt_ids, images, multimodal_fields, num_generations, has_tool_images, rows, prompts, group
                )
                taken = (~spread & attempt[4]).cpu()
                for row in torch.nonzero(taken[groups]).flatten().tolist():
                    completion_ids[row] = attempt[0][row]
                    if logprobs is not None:
                        logprobs[row] = attempt[1][row]
                    prompt_routes[row], completion_routes[row] = attempt[2][row], attempt[3][row]
                    attempt_of_row[row] = attempts
                spread = spread | taken.to(spread.device)
        finally:
            self._regenerating = False
        self._replay.set_trace(
            pad_routes(prompt_routes, completion_routes, self.pad_to_multiple_of).to(self.accelerator.device)
        )
        self.last_regeneration_attempts = attempt_of_row
        metrics = self._metrics["train"]
        metrics["routing/reward_spread_share_first_generation"].append(first_share)
        metrics["routing/regeneration_attempts"].append(float(attempts))
        return completion_ids, logprobs

    def _scored_attempt(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images, rows, prompts, group
    ):
        """One generation of the batch: `(completion_ids, logprobs, prompt_routes, completion_routes, spread)`, the
        routes cut per row out of the attempt's trace, `spread` the `[groups]` reward spread over all processes."""
        completion_ids, logprobs = self._generate_single_turn(
            prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
        completion_ids, logprobs = list(completion_ids), None if logprobs is None else list(logprobs)
        prompt_routes, completion_routes = unpad_routes(
            self._replay.trace,
            [len(ids) for ids in prompt_ids],
            [len(ids) for ids in completion_ids],
            self.pad_to_multiple_of,
        )
        # The reward functions' own logging (`log_extra`, `log_metric`) is for the final rollouts only.
        pending = copy.deepcopy(self._pending_extra_logs), copy.deepcopy(self._pending_metrics)
        try:
            completions = self._decode_for_rewards(prompts, prompt_ids, completion_ids)
            rewards_per_func = super()._calculate_rewards(rows, prompts, completions, completion_ids)
        finally:
            self._pending_extra_logs, self._pending_metrics = pending
        spread = self._group_reward_spread(rewards_per_func, group)
        return completion_ids, logprobs, prompt_routes, completion_routes, spread

    def _decode_for_rewards(self, prompts: list, prompt_ids: list, completion_ids: list) -> list:
        """The completions as TRL's `_generate` decodes them for the reward functions (single-turn, no tools)."""
        if not is_conversational({"prompt": prompts[0]}):
            return self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        tokenizer = self._tokenizer
        if getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None):
            return [[parse_response(tokenizer, ids, prefix=prompt_ids[i])] for i, ids in enumerate(completion_ids)]
        contents = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        return [[{"role": "assistant", "content": content}] for content in contents]

    def _rollout_policy_log_probs(self, log_probs: torch.Tensor) -> torch.Tensor:
        """The law training rollouts drew their sets from: the selection distribution tempered by
        `rollout_routing_temperature` (`docs/design.md` §2). Evaluation routes top-K and is scored untempered."""
        active = self._active_routing()
        return tempered_log_probs(log_probs, active.temperature) if active.rollout == "sample" else log_probs

    def _router_entropy(
        self, mode: str, inputs: dict[str, Any], log_probs: torch.Tensor, gate_mask: torch.Tensor
    ) -> torch.Tensor:
        """Entropy of the routers' selection distributions (`log_probs`, `[layers, rows, experts]`, masked as the
        sampler masked them, untempered), averaged over layers, then over the Gate-GRPO positions with Gate-GRPO's
        normalization of `loss_type` (so gradient accumulation leaves it unchanged). Logged as `gate/entropy`."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        finite = log_probs.masked_fill(~torch.isfinite(log_probs), 0.0)  # masked experts: p = 0, no NaN gradient
        entropy = -(log_probs.exp() * finite).sum(-1).mean(0).reshape(gate_mask.shape)
        dapo_normalizer = inputs["num_gate_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            dapo_normalizer = dapo_normalizer * accumulation / self.args.steps_per_generation
        prompt_width = inputs["prompt_ids"].size(1)
        completion_only = self.args.gate_loss_positions == "completion"
        max_length = self.max_completion_length + (0 if completion_only else prompt_width)
        self._log_masked_mean(mode, "gate/entropy", entropy.detach(), gate_mask)
        return reduce_like_trl(entropy, gate_mask, self.loss_type, accumulation, max_length, dapo_normalizer)

    # ------------------------------------------------------------------ replay in every forward

    def _get_per_token_logps_and_entropies(self, model, input_ids, *args, **kwargs):
        controller = self.ref_routing if self.ref_model is not None and model is self.ref_model else self.routing
        routes = self._replay.trace_to_replay()
        reference = self._is_reference_forward(model)
        controller.start_replay(routes, dispatch=self._active_routing().dispatch_recorded)
        result = super()._get_per_token_logps_and_entropies(model, input_ids, *args, **kwargs)
        controller.finish_replay()
        if not reference:
            # Read now, before another forward (the reference pass shares the policy's controller under PEFT) replays.
            captures = controller.captures()
            if self._replay.scoring_rollouts:  # TRL's old-log-prob pass, run only when generations are reused
                with torch.no_grad():
                    self._replay.keep_old_gate_logps(self._gate_log_probs(captures, input_ids).detach())
            else:
                self._replay.keep_policy_captures(captures)
        return result

    def _is_reference_forward(self, model) -> bool:
        """Whether TRL calls `model` for its reference log-probs: the `ref_model`, or a PEFT policy whose adapters are
        disabled (a new adapter) or whose "ref" adapter is active (a pretrained one)."""
        if self.ref_model is not None and model is self.ref_model:
            return True
        unwrapped = self.accelerator.unwrap_model(model)
        if not is_peft_model(unwrapped):
            return False
        # PEFT keeps `_adapters_disabled` while `disable_adapter()` is open (no public flag exposes it).
        return bool(getattr(unwrapped, "_adapters_disabled", False)) or unwrapped.active_adapter == "ref"

    @contextlib.contextmanager
    def _routing_step(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for controller in (self.routing, self.ref_routing):
                if controller is not None:
                    stack.enter_context(controller.step_scope())
            try:
                yield
            finally:
                self._replay.end_step()

    def training_step(self, model, inputs, num_items_in_batch):
        with self._routing_step():
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys: list[str] | None = None):
        with self._routing_step():
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """TRL's evaluation (top-K routing), plus the routing measures of the whole evaluation set as metrics:
        `<prefix>_routing/{sequence_routing_entropy, pooled_routing_entropy, mean_gate_entropy, task_jsd}`."""
        self._eval_routing = EvalRoutingCollector(
            self.routing.num_layers, self.routing.num_experts, self.args.task_column
        )
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            identity = model_identity(self.routing_model, self.routing)
            self.last_eval_routing = self._eval_routing.analysis(f"step {self.state.global_step}", identity)
        finally:
            self._eval_routing = None
        for key, value in self.last_eval_routing.summary().items():
            if value is not None:
                output.metrics[f"{metric_key_prefix}_routing/{key}"] = value
        return output

    # ------------------------------------------------------------------ Token-GRPO (TRL's, replayed) + Gate-GRPO

    def _compute_loss(self, model, inputs):
        self._replay.begin_loss(inputs["routed_experts"])
        token_loss = super()._compute_loss(model, inputs)
        captures = self._replay.take_policy_captures()
        token_loss = token_loss * self._zero_spread_factor(inputs, "token")  # 1 unless `zero_spread_groups`
        return self.args.token_loss_coef * token_loss + self._routing_loss(inputs, captures)

    @staticmethod
    def _balance_mask(routes: torch.Tensor, prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """`[batch, tokens]` bool: the tokens the balance loss counts, non-padding with a recorded route."""
        return (routes[..., 0, 0] >= 0) & torch.cat([prompt_mask, completion_mask], dim=1).bool()

    def _gate_mask(self, routes: torch.Tensor, prompt_mask: torch.Tensor, completion_mask: torch.Tensor):
        """`[batch, tokens]` bool: the positions whose recorded routing Gate-GRPO trains.

        Rows whose completion mask is all zero are left out entirely: TRL zeroes a truncated rollout's completion mask
        under `mask_truncated_completions` (a completion always has at least one token otherwise), and the prompt's
        routing must not be trained with that rollout's advantage either.
        """
        mask = self._balance_mask(routes, prompt_mask, completion_mask)
        mask &= completion_mask.bool().any(dim=1, keepdim=True)
        if self.args.gate_loss_positions == "completion":
            mask[:, : prompt_mask.size(1)] = False
        return mask

    def _selection_log_probs(self, captures: list[LayerCapture], modality: torch.Tensor | None) -> torch.Tensor:
        """`[layers, rows, experts]` log selection probabilities, masked as the rollouts' sampler masked them."""
        log_probs = torch.stack([a.selection_log_probs(c.logits) for a, c in zip(self.routing.adapters, captures)])
        masks = self.routing.expert_masks
        # Only drawn routes were drawn under the masks; top-K rollouts (evaluation's among them) took the stock choice.
        if modality is None or masks is None or not self._active_routing().draws_routes:
            return log_probs
        allowed = masks.to(log_probs.device)[:, modality.long()]  # [layers, rows, experts]
        valid = torch.stack([c.valid for c in captures])[..., None]
        # Only recorded routes were drawn under the mask; other rows keep the unmasked law so nothing is -inf there.
        return torch.where(valid & ~allowed, float("-inf"), log_probs).log_softmax(-1)

    def _gate_log_probs(
        self, captures: list[LayerCapture], input_ids: torch.Tensor, log_probs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[batch, tokens, layers]` log-probability of each recorded expert set under the live gates."""
        if log_probs is None:
            log_probs = self._selection_log_probs(captures, self.routing.token_modality(input_ids).reshape(-1))
        log_probs = self._rollout_policy_log_probs(log_probs)  # the tempered law rollouts drew from
        recorded = torch.stack([c.recorded for c in captures])  # [layers, rows, top_k]
        set_lp = set_log_prob(log_probs, recorded, self.args.gate_set_logprob)  # [layers, rows]
        return set_lp.t().reshape(*input_ids.shape, -1)

    def _routing_loss(self, inputs: dict[str, Any], captures: list[LayerCapture]) -> torch.Tensor:
        """Gate-GRPO plus the balance loss, from `captures`: what the training forward of `inputs` captured."""
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        routes = inputs["routed_experts"]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        prompt_width = inputs["prompt_ids"].size(1)
        modality = self.routing.token_modality(input_ids)
        log_probs = self._selection_log_probs(captures, modality.reshape(-1))
        gate_mask = self._gate_mask(routes, inputs["prompt_mask"], inputs["completion_mask"])
        loss = torch.zeros((), device=input_ids.device)

        if self.args.gate_loss_coef > 0:
            gate_logps = self._gate_log_probs(captures, input_ids, log_probs)
            old_gate_logps = inputs.get("old_gate_logps", gate_logps.detach())
            per_decision = clipped_objective(
                gate_logps - old_gate_logps,
                inputs["advantages"].reshape(-1, 1, 1),
                self.loss_type,
                self.epsilon_low,
                self.epsilon_high,
                delta=self.args.delta,
                sapo_temperature_pos=self.args.sapo_temperature_pos,
                sapo_temperature_neg=self.args.sapo_temperature_neg,
            )
            per_decision = torch.where(gate_mask[..., None], per_decision, 0.0)  # keeps NaN-free gradients
            dapo_normalizer = inputs["num_gate_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                dapo_normalizer = dapo_normalizer * accumulation / self.args.steps_per_generation
            max_length = self.max_completion_length + (
                0 if self.args.gate_loss_positions == "completion" else prompt_width
            )
            gate_loss = reduce_like_trl(
                per_decision.mean(-1), gate_mask, self.loss_type, accumulation, max_length, dapo_normalizer
            )
            gate_loss = gate_loss * self._zero_spread_factor(inputs, "gate", gate_mask)  # 1 unless excluded
            loss = loss + self.args.gate_loss_coef * gate_loss
            self._log_masked_mean(mode, "gate/loss", per_decision.detach().mean(-1), gate_mask)
            ratio = torch.exp(gate_logps.detach() - old_gate_logps)
            advantages = inputs["advantages"].reshape(-1, 1, 1)
            clipped = ((ratio < 1 - self.epsilon_low) & (advantages < 0)) | (
                (ratio > 1 + self.epsilon_high) & (advantages > 0)
            )
            self._log_masked_mean(mode, "gate/clip_ratio", clipped.float().mean(-1), gate_mask)

        if self.args.router_entropy_coef > 0:
            loss = loss - self.args.router_entropy_coef * self._router_entropy(mode, inputs, log_probs, gate_mask)

        dispatched = torch.stack([c.dispatched for c in captures])
        if self.balance_loss_coef:
            counted = self._balance_mask(routes, inputs["prompt_mask"], inputs["completion_mask"]).reshape(-1)
            # The expert load of the whole generation batch, fixed: the loss is linear in this micro-batch's tokens,
            # so micro-batches add up to the loss of their accumulation window (normalized like TRL's `dapo`).
            balance_sum = balance_loss_given_load(
                log_probs.exp(), counted, inputs["expert_load"][0], self.routing.num_experts
            )
            normalizer = inputs["num_balance_tokens_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            loss = loss + self.balance_loss_coef * balance_sum / normalizer
            self._log_mean(mode, "routing/balance_loss", balance_sum.detach() / counted.sum().clamp(min=1))

        self._log_routing_metrics(mode, captures, log_probs.detach(), dispatched, attention_mask, gate_mask)
        if self._eval_routing is not None:
            counted = self._balance_mask(routes, inputs["prompt_mask"], inputs["completion_mask"])
            self._eval_routing.add_routing(routes, counted, log_probs.detach(), modality)
        return loss

    # ------------------------------------------------------------------ metrics

    @torch.no_grad()
    def _log_routing_metrics(self, mode, captures, log_probs, dispatched, attention_mask, gate_mask) -> None:
        batch_shape = attention_mask.shape
        entropy = gate_entropy(log_probs).mean(0).reshape(batch_shape)  # per token: mean over layers
        self._log_masked_mean(mode, "routing/entropy", entropy, attention_mask)
        recorded = torch.stack([c.recorded for c in captures])
        top_k = torch.stack([c.top_k for c in captures])
        differs = differs_from_top_k(recorded, top_k, self.routing.num_experts).float().mean(0).reshape(batch_shape)
        self._log_masked_mean(mode, "routing/sampled_differs_from_topk", differs, gate_mask)
        # Expert utilization per layer: perplexity of the expert load over N (1 = perfectly even, 1/N = one expert).
        weight = attention_mask.reshape(1, -1, 1).float()
        load = torch.zeros(*dispatched.shape[:2], self.routing.num_experts, device=dispatched.device)
        load = load.scatter_add_(-1, dispatched, torch.ones_like(dispatched, dtype=load.dtype))
        load = self.accelerator.reduce((load * weight).sum(1), reduction="sum")  # [layers, experts]
        for layer, value in enumerate(expert_utilization(load).tolist()):
            self._metrics[mode][f"routing/expert_utilization/layer_{layer:02d}"].append(value)
