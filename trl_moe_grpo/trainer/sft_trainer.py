"""`MoESFTTrainer`: supervised fine-tuning baselines for MoE models, on TRL's `SFTTrainer`.

The paper compares MoE-GRPO with supervised fine-tuning of the same MoE model on the same data, and compares routing
schemes. Each is one value of `train_routing`, the routing of the *training* forward (evaluation and inference always
use the stock top-K):

- Det-FT ............... `train_routing="topk"`: the stock top-K;
- Stoch-FT-Multi ....... `"sample"`: K experts drawn without replacement from the gate probabilities;
- Stoch-FT-Noise ....... `"noise"`: V-MoE's noisy top-K, Gaussian noise of std `routing_noise_std` (default
  `1 / num_experts`) on the router logits, then top-K, mixed with the noisy weights (`noisy_mixing_weights`);
- Expert Choice ........ `"expert_choice"`: every expert takes its top tokens of the batch, under
  `expert_capacity_factor`; a token keeps every expert that took it, weighted by its gate probability;
- optimal transport .... `"sinkhorn"`: `sinkhorn_iterations` Sinkhorn iterations balance the assignment, then top-K.

Each runs with or without the load-balancing loss (`router_aux_loss_coef`, 0 turns it off), which is computed on the
experts the tokens were actually dispatched to.

How it hooks into TRL (each override is the narrowest method that does the job and calls `super()`):

- `__init__`: a routing controller on the model's routers (a dense model is refused); TRL's own MoE auxiliary loss is
  turned off, since it would score a fresh top-K instead of the routes taken (and crashes for InternVL outputs).
- `training_step`: the routing context spans the whole step, forward *and* backward, so that gradient checkpointing's
  recompute dispatches the experts the forward drew.
- `compute_loss`: TRL's SFT loss, plus the load-balancing loss on the dispatched sets, plus routing metrics.
- `prediction_step` (through `compute_loss`): stock top-K routing.
- `create_optimizer`: an optional learning rate of the routers' own (`router_learning_rate`).
- `_save`: the routing options next to every checkpoint (`moe_sft_routing.json`).

`data_utils.sft_rows_from_answers` turns a MoE-GRPO dataset (`prompt` + `answer`) into the prompt-completion rows SFT
trains on, so both methods see exactly the same data. The configuration is `sft_config.MoESFTConfig`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers.utils import logging
from trl import SFTTrainer

from ..analysis.measures import differs_from_top_k, gate_entropy
from ..errors import MoEGRPOError
from ..losses import routed_load_balancing_loss
from ..routing import RoutingController, find_routers
from ..routing.controller import TrainingCapture, TrainingRoutes, stacked_slots
from .common import MoETrainerMixin, peft_config_training_routers, resolve_args, user_router_logits_flag
from .options import training_routing_kwargs
from .sft_config import ROUTING_FILE, ROUTING_OPTIONS, MoESFTConfig

logger = logging.get_logger(__name__)

# Share of a batch's tokens that no expert took under Expert Choice above which the trainer warns (once). Measured on
# the bundled model, 32 visual_mc prompts in one batch: 3.2% at `expert_capacity_factor=1`, 97.9% at 0.01.
DROPPED_TOKENS_WARNING = 0.25


def _column_names(dataset) -> list[str] | None:
    """The columns of a `datasets` dataset or a list of row dicts; None where they cannot be read without iterating."""
    if isinstance(dataset, list):
        return list(dataset[0]) if dataset and isinstance(dataset[0], dict) else None
    columns = getattr(dataset, "column_names", None)
    return list(columns) if isinstance(columns, list) else None


def _refuse_rows_without_completion(dataset, name: str) -> None:
    """Refuse MoE-GRPO rows (`prompt` + `answer`, no `completion`), which TRL would fail on with a bare KeyError."""
    if isinstance(dataset, dict):  # several named evaluation datasets
        for key, split in dataset.items():
            _refuse_rows_without_completion(split, f"{name}[{key!r}]")
        return
    columns = _column_names(dataset)
    # Tokenized rows (`input_ids`) are used as they are; `prompt` without `completion` is what SFT cannot train.
    if columns is None or "input_ids" in columns or "prompt" not in columns or "completion" in columns:
        return
    raise MoEGRPOError(
        f"The `{name}` rows have a `prompt` but no `completion` column (columns: {sorted(columns)}): these look like "
        "MoE-GRPO rows (prompt + answer). SFT trains on prompt-completion rows: pass "
        f"`trl_moe_grpo.data_utils.sft_rows_from_answers({name})`, which adds each row's answer as its completion."
    )


class MoESFTTrainer(MoETrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` for MoE models with a chosen training-forward routing: the fine-tuning baselines.

    It takes the same arguments as `SFTTrainer` (model, datasets, processing class, callbacks...) and an
    [`MoESFTConfig`]. With `train_routing="topk"` and `router_aux_loss_coef=0` it computes exactly what
    `SFTTrainer` computes (with its own aux loss off).

    Under PEFT with a `LoraConfig`, the routers' weights are added to the adapter's `target_parameters` as in
    [`MoEGRPOTrainer`], so the routing baselines train the routing too.
    """

    _tag_names = ["trl", "sft", "moe-sft"]
    _name = "MoE-SFT"

    def __init__(self, model, args: MoESFTConfig | None = None, *pargs, **kwargs):
        args = resolve_args(model, args, MoESFTConfig, "MoESFTTrainer", "MoE-SFT")
        if not isinstance(model, str):
            # Before TRL's checks, so a dense model gets the same explanation as in MoEGRPOTrainer.
            find_routers(model.get_base_model() if hasattr(model, "get_base_model") else model)
        # TRL's SFTTrainer rewrites `output_router_logits` to match its aux loss: saved models keep the user's value.
        users_flag = user_router_logits_flag(model, args)
        # SFTTrainer's positional order after `args`: data_collator, train_dataset, eval_dataset.
        for position, name in ((1, "train_dataset"), (2, "eval_dataset")):
            _refuse_rows_without_completion(kwargs.get(name, pargs[position] if len(pargs) > position else None), name)
        if kwargs.get("peft_config") is not None:
            kwargs["peft_config"] = peft_config_training_routers(kwargs["peft_config"], model, args)
        super().__init__(model, args, *pargs, **kwargs)
        self._refuse_reentrant_checkpointing()

        self.routing = RoutingController(self.routing_model)
        self._take_over_balance_loss(self.routing_model, policy_flag=users_flag)
        if not self.router_trainable_parameters():
            logger.warning(
                "No router parameter is trainable (e.g. a PEFT adapter that leaves them frozen): the baseline "
                "fine-tunes the experts only, with the routing it starts from."
            )
        self._step_routes: TrainingRoutes | None = None  # the routing context of the running training step
        self._warned_on_dropped_tokens = False

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        options = {name: getattr(self.args, name) for name in ROUTING_OPTIONS}
        options["router_aux_loss_coef"] = self.balance_loss_coef
        with open(os.path.join(output_dir, ROUTING_FILE), "w") as f:
            json.dump(options, f, indent=1)

    # ------------------------------------------------------------------ routing of each step

    def _routing_kwargs(self, mode: str) -> dict[str, Any]:
        return training_routing_kwargs(self.args, mode)

    @contextlib.contextmanager
    def routing_step(self) -> Iterator[TrainingRoutes]:
        """Route with `train_routing` while open: wrap one batch's forward *and* backward in it.

        `training_step` does this; use it directly to call `compute_loss` and `backward` yourself in training mode.
        """
        if self._step_routes is not None:
            raise MoEGRPOError("`routing_step` is already open: one batch at a time.")
        with self.routing.training_routing(**self._routing_kwargs(self.args.train_routing)) as routes:
            self._step_routes = routes
            try:
                yield routes
            finally:
                self._step_routes = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.routing_step():
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        with contextlib.ExitStack() as stack:
            routes = self._step_routes
            if routes is None:
                if mode == "train" and self.args.train_routing != "topk":
                    raise MoEGRPOError(
                        f"`compute_loss` ran in training mode outside a training step with "
                        f"train_routing={self.args.train_routing!r}: backward's checkpoint recompute would not see "
                        "the drawn routes. Call `training_step`, or wrap the forward and backward in "
                        "`with trainer.routing_step():`."
                    )
                # Evaluation (prediction_step) routes like inference: the stock top-K.
                routes = stack.enter_context(self.routing.training_routing(**self._routing_kwargs("topk")))
            elif mode == "eval":
                raise MoEGRPOError("`compute_loss` ran in evaluation mode inside `routing_step`; evaluate outside it.")
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = result if return_outputs else (result, None)
            balance = self._balance_loss(mode, routes.captures(), routes.mode)
            if self.balance_loss_coef:
                # Like TRL's MoE aux loss: with `num_items_in_batch` the loss itself carries gradient accumulation.
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                loss = loss + self.balance_loss_coef * balance / steps
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ load balance and metrics

    def _balance_loss(self, mode: str, captures: list[TrainingCapture], routing: str) -> torch.Tensor:
        """Load-balancing loss on the dispatched sets (with gradients only when it is weighted); logs the metrics."""
        adapters = self.routing.adapters
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.balance_loss_coef)):
            log_probs = torch.stack([a.selection_log_probs(c.logits) for a, c in zip(adapters, captures)])
            dispatched, active = stacked_slots(captures)
            token_mask = captures[0].valid
            balance = routed_load_balancing_loss(
                log_probs.exp(), dispatched, token_mask, self.routing.num_experts, active
            )
        self._log_routing_metrics(mode, captures, log_probs.detach(), dispatched, active, balance.detach(), routing)
        return balance

    @torch.no_grad()
    def _log_routing_metrics(self, mode, captures, log_probs, dispatched, active, balance, routing) -> None:
        valid = captures[0].valid
        self._log_mean(mode, "routing/balance_loss", balance)
        self._log_masked_mean(mode, "routing/entropy", gate_entropy(log_probs).mean(0), valid)
        # The set of experts that carry weight, against the router's stock choice (inactive slots never count).
        top_k = torch.stack([c.top_k for c in captures])
        differs = differs_from_top_k(dispatched, top_k, self.routing.num_experts, active).float().mean(0)
        self._log_masked_mean(mode, "routing/dispatched_differs_from_topk", differs, valid)
        if routing == "expert_choice":
            choices = torch.stack([c.num_choices for c in captures])  # [layers, rows]
            # Shares of the (non-padding token, layer) decisions: taken by no expert, or by more than top_k.
            dropped = (choices == 0).float().mean(0)
            self._log_masked_mean(mode, "routing/dropped_tokens", dropped, valid)
            truncated = (choices > self.routing.top_k).float().mean(0)
            self._log_masked_mean(mode, "routing/more_than_top_k_tokens", truncated, valid)
            self._log_masked_mean(mode, "routing/experts_per_token", choices.float().mean(0), valid)
            if mode == "train":
                self._warn_on_dropped_tokens(float(dropped[valid].mean()) if bool(valid.any()) else 0.0)

    def _warn_on_dropped_tokens(self, share: float) -> None:
        """Say once when Expert Choice leaves most tokens to the residual connection: a capacity factor too small."""
        if self._warned_on_dropped_tokens or share < DROPPED_TOKENS_WARNING:
            return
        self._warned_on_dropped_tokens = True
        logger.warning(
            f"Expert Choice routing: no expert took {share:.0%} of the tokens of a training batch (averaged over "
            f"layers); they pass through the residual connection only and their experts get no training. "
            f"`expert_capacity_factor={self.args.expert_capacity_factor}` gives each expert that share of the "
            "batch's tokens times top_k / num_experts; raise it (1.0 fills as many expert slots as top-K routing)."
        )
