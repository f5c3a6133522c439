"""`MoEGRPOTrainer`: TRL's `GRPOTrainer` with sampled routing, routing replay, Token-GRPO and Gate-GRPO.

How it hooks into TRL (each override is the narrowest method that does the job and calls `super()`):

- `_generate_single_turn`: rollouts run with the routing controller in `rollout_routing` mode, which records every
  token's expert ids; they become a trace laid out like TRL's token ids.
- `_generate_and_score_completions`: the trace joins the batch dict as `routed_experts`, so TRL's buffering,
  shuffling and micro-batch splitting keep it aligned with its rows for free.
- `_get_per_token_logps_and_entropies`: every forward TRL makes (old log-probs, reference, policy) replays the trace.
  Token-GRPO is therefore TRL's own token loss, computed under replay.
- `_compute_loss`: adds Gate-GRPO and the load-balancing loss on the routed sets, from what the replayed forward
  captured.
- `create_optimizer`: an optional learning rate of the routers' own (`router_learning_rate`).
- `training_step` / `prediction_step`: bound the replay state to the whole step, backward (checkpoint recompute)
  included.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from .errors import MoEGRPOError
from .grpo_config import MoEGRPOConfig
from .guidance import ModalityStatistics, calibrate, vision_token_ids
from .losses import clipped_objective, reduce_like_trl, routed_load_balancing_loss, set_log_prob
from .routing import RoutingController, pad_routes, split_rollout_routes
from .routing.controller import LayerCapture
from .trainer_common import MoETrainerMixin
from .zero3 import gathered_parameters

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
)


class MoEGRPOTrainer(MoETrainerMixin, GRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` that trains the expert routing of MoE models with MoE-GRPO.

    It takes the same arguments as `GRPOTrainer` (model, reward functions, datasets, PEFT config, callbacks...) and an
    [`MoEGRPOConfig`]. With `rollout_routing="topk"` and `gate_loss_coef=0` it is plain GRPO with rollout routing
    replay (R3): the training forward routes every token as the rollout did.
    """

    _tag_names = ["trl", "grpo", "moe-grpo"]
    _name = "MoE-GRPO"

    def __init__(self, model, reward_funcs=None, args: MoEGRPOConfig | None = None, *pargs, **kwargs):
        if args is not None and not isinstance(args, MoEGRPOConfig):
            raise MoEGRPOError(
                f"MoEGRPOTrainer needs an `MoEGRPOConfig`, got `{type(args).__name__}`. Build one with the same "
                "arguments: `MoEGRPOConfig(**your_args.to_dict())` keeps every GRPO option."
            )
        for unsupported in ("tools", "rollout_func", "environment_factory"):
            if kwargs.get(unsupported) is not None:
                raise MoEGRPOError(
                    f"`{unsupported}` is not supported by MoEGRPOTrainer yet: multi-turn and custom rollouts bypass "
                    "the routing trace of each generated token. Use single-turn prompts."
                )
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
            args = MoEGRPOConfig(f"{str(name).split('/')[-1]}-MoE-GRPO")
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
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

        if args.greedy_decoding:
            greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None}
            self.generation_config.update(**greedy)
            if self.generation_kwargs is not None:
                self.generation_kwargs.update(greedy)

        self._batch_routes: torch.Tensor | None = None  # the trace the next forward replays

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

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        routing = self.args.rollout_routing if self.model.training else "topk"  # evaluation routes like inference
        with self.routing.rollout(routing, self.args.routing_noise_std) as recording:
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        prompt_routes, completion_routes = split_rollout_routes(
            recording, [len(ids) for ids in prompt_ids], [len(ids) for ids in completion_ids]
        )
        self._batch_routes = pad_routes(prompt_routes, completion_routes, self.pad_to_multiple_of).to(
            self.accelerator.device
        )
        return completion_ids, logprobs

    def _generate_and_score_completions(self, inputs):
        self._batch_routes = None
        output = super()._generate_and_score_completions(inputs)
        routes, self._batch_routes = self._batch_routes, None
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        if routes is None or routes.shape[:2] != input_ids.shape:
            raise MoEGRPOError(
                f"Routing trace {None if routes is None else tuple(routes.shape[:2])} does not match the batch's "
                f"token ids {tuple(input_ids.shape)}; was generation run through `_generate_single_turn`?"
            )
        output["routed_experts"] = routes
        if "old_per_token_logps" in output:
            # Generations are reused across optimizer steps: score the sets under the policy that drew them, from
            # the no-grad replayed forward TRL just ran for its old token log-probs.
            with torch.no_grad():
                output["old_gate_logps"] = self._gate_log_probs(self.routing.captures(), input_ids).detach()
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        gate_mask = self._gate_mask(routes, attention_mask, output["prompt_ids"].size(1))
        output["num_gate_items_in_batch"] = self.accelerator.gather(gate_mask.sum()).sum()
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        if group > 1:
            # The learning signal of GRPO: if the G rollouts of a prompt agree, every advantage is zero.
            within = nanstd(rewards.view(-1, group), dim=1)
            self._metrics[mode]["reward_std_within_group"].append(torch.nanmean(within).item())
        return rewards_per_func

    # ------------------------------------------------------------------ replay in every forward

    def _get_per_token_logps_and_entropies(self, model, input_ids, *args, **kwargs):
        controller = self.ref_routing if self.ref_model is not None and model is self.ref_model else self.routing
        if self._batch_routes is None:
            raise MoEGRPOError("A training forward ran without a routing trace to replay.")
        controller.start_replay(self._batch_routes, dispatch=self.args.routing_replay)
        result = super()._get_per_token_logps_and_entropies(model, input_ids, *args, **kwargs)
        controller.finish_replay()
        return result

    @contextlib.contextmanager
    def _routing_step(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for controller in (self.routing, self.ref_routing):
                if controller is not None:
                    stack.enter_context(controller.step_scope())
            try:
                yield
            finally:
                self._batch_routes = None

    def training_step(self, model, inputs, num_items_in_batch):
        with self._routing_step():
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys: list[str] | None = None):
        with self._routing_step():
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    # ------------------------------------------------------------------ Token-GRPO (TRL's, replayed) + Gate-GRPO

    def _compute_loss(self, model, inputs):
        self._batch_routes = inputs["routed_experts"]
        token_loss = super()._compute_loss(model, inputs)
        return self.args.token_loss_coef * token_loss + self._routing_loss(inputs)

    def _gate_mask(self, routes: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """`[batch, tokens]` bool: the positions whose recorded routing Gate-GRPO trains."""
        mask = (routes[..., 0, 0] >= 0) & attention_mask.bool()
        if self.args.gate_loss_positions == "completion":
            mask[:, :prompt_width] = False
        return mask

    def _selection_log_probs(self, captures: list[LayerCapture], modality: torch.Tensor | None) -> torch.Tensor:
        """`[layers, rows, experts]` log selection probabilities, masked as the rollouts' sampler masked them."""
        log_probs = torch.stack([a.selection_log_probs(c.logits) for a, c in zip(self.routing.adapters, captures)])
        masks = self.routing.expert_masks
        # Evaluation rollouts route with the stock top-K (`_generate_single_turn`): no mask shaped their sets.
        if modality is None or masks is None or self.args.rollout_routing == "topk" or not self.model.training:
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
        recorded = torch.stack([c.recorded for c in captures])  # [layers, rows, top_k]
        set_lp = set_log_prob(log_probs, recorded, self.args.gate_set_logprob)  # [layers, rows]
        return set_lp.t().reshape(*input_ids.shape, -1)

    def _routing_loss(self, inputs: dict[str, Any]) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        routes = inputs["routed_experts"]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        prompt_width = inputs["prompt_ids"].size(1)
        captures = self.routing.captures()
        log_probs = self._selection_log_probs(captures, self.routing.token_modality(input_ids).reshape(-1))
        gate_mask = self._gate_mask(routes, attention_mask, prompt_width)
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
            loss = loss + self.args.gate_loss_coef * gate_loss
            self._log_masked_mean(mode, "gate/loss", per_decision.detach().mean(-1), gate_mask)
            ratio = torch.exp(gate_logps.detach() - old_gate_logps)
            advantages = inputs["advantages"].reshape(-1, 1, 1)
            clipped = ((ratio < 1 - self.epsilon_low) & (advantages < 0)) | (
                (ratio > 1 + self.epsilon_high) & (advantages > 0)
            )
            self._log_masked_mean(mode, "gate/clip_ratio", clipped.float().mean(-1), gate_mask)

        flat_mask = attention_mask.reshape(-1)
        dispatched = torch.stack([c.dispatched for c in captures])
        if self.balance_loss_coef:
            balance = routed_load_balancing_loss(log_probs.exp(), dispatched, flat_mask, self.routing.num_experts)
            loss = loss + self.balance_loss_coef * balance / accumulation
            self._log_mean(mode, "routing/balance_loss", balance.detach())

        self._log_routing_metrics(mode, captures, log_probs.detach(), dispatched, attention_mask, gate_mask)
        return loss

    # ------------------------------------------------------------------ metrics

    @torch.no_grad()
    def _log_routing_metrics(self, mode, captures, log_probs, dispatched, attention_mask, gate_mask) -> None:
        batch_shape = attention_mask.shape
        entropy = -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1).mean(0).reshape(batch_shape)
        self._log_masked_mean(mode, "routing/entropy", entropy, attention_mask)
        recorded = torch.stack([c.recorded for c in captures]).sort(-1).values
        top_k = torch.stack([c.top_k for c in captures]).sort(-1).values
        differs = (recorded != top_k).any(-1).float().mean(0).reshape(batch_shape)
        self._log_masked_mean(mode, "routing/sampled_differs_from_topk", differs, gate_mask)
        # Expert utilization per layer: perplexity of the expert load over N (1 = perfectly even, 1/N = one expert).
        weight = attention_mask.reshape(1, -1, 1).float()
        load = torch.zeros(*dispatched.shape[:2], self.routing.num_experts, device=dispatched.device)
        load = load.scatter_add_(-1, dispatched, torch.ones_like(dispatched, dtype=load.dtype))
        load = self.accelerator.reduce((load * weight).sum(1), reduction="sum")  # [layers, experts]
        share = load / load.sum(-1, keepdim=True).clamp(min=1.0)
        perplexity = torch.exp(-(share * share.clamp(min=1e-12).log()).sum(-1))
        for layer, value in enumerate((perplexity / self.routing.num_experts).tolist()):
            self._metrics[mode][f"routing/expert_utilization/layer_{layer:02d}"].append(value)
