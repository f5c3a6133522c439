"""`CLIPMoEGRPOTrainer` (MoE-GRPO for image classification) and `CLIPDetFTTrainer` (the Det-FT baseline).

Both are `transformers.Trainer` subclasses on a CLIP-MoE (`modeling.py`) and a dataset with `image` and `label`
columns. The classifier is CLIP's zero-shot one over class-prompt embeddings (`classify.py`), computed once by the
frozen text tower; what trains is the vision tower (or only its routers, `train_parameters="routers"`).

MoE-GRPO, per batch of images (`docs/design.md` §1-§5 for the shared machinery):

1. Rollouts: every image is repeated `num_generations` (G) times and encoded once with routing *sampled* from the
   gates (`RoutingController.rollout("sample")`, Gumbel-top-K; every token of the vision encoder, the class token and
   the patches, is routed in every MoE layer). The expert ids are recorded as an int16 trace `[rows, tokens, layers,
   top_k]`. The prediction of each rollout is the arg-max class; its reward is 1 when it is the label.
2. Advantages: GRPO's group-relative advantages over each image's G rewards (`rewards.group_advantages`).
3. Loss: the recorded routes are *replayed* in a forward with gradients (`start_replay`), so the live routers'
   probabilities of the sets that produced each rollout are exact; Gate-GRPO (`losses.set_log_prob`,
   `losses.clipped_objective`, normalized like TRL's `loss_type` by `losses.reduce_like_trl`) on every routed
   token, plus the Switch load-balancing loss on the routed sets (`losses.routed_load_balancing_loss`). There are no
   text tokens, so there is no token term. One optimizer step per generation: the old log-probabilities are the
   current ones, detached.

Det-FT: cross-entropy on the zero-shot logits, with the stock top-K routing (`train_routing="topk"`, or another
training routing of `RoutingController.training_routing`), plus the same load-balancing loss on the dispatched sets.

Evaluation (`evaluate`) and inference use the routers' stock top-K: `evaluate` reports top-1 accuracy on each
evaluation dataset.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..analysis.measures import differs_from_top_k, gate_entropy
from ..errors import MoEGRPOError
from ..losses import clipped_objective, reduce_like_trl, routed_load_balancing_loss, set_log_prob
from ..routing import RoutingController
from ..routing.controller import stacked_slots
from ..trainer.optim import set_router_learning_rate
from ..trainer.options import training_routing_kwargs
from .classify import class_embeddings, class_names_of, image_logits, pixel_values
from .config import CLIPClassificationConfig, CLIPDetFTConfig, CLIPMoEGRPOConfig
from .evaluation import zero_shot_accuracy
from .modeling import vision_encoder
from .rewards import classification_rewards, group_advantages


class _CLIPClassificationTrainer(Trainer):
    """What both classification trainers share: data, classifier, routing controller, parameters, metrics, eval."""

    config_class: type[CLIPClassificationConfig] = CLIPClassificationConfig
    _name = ""

    def __init__(
        self,
        model,
        args: CLIPClassificationConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        tokenizer=None,
        image_processor=None,
        class_names=None,
        **kwargs,
    ):
        if isinstance(model, str):
            from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

            path = model
            model = AutoModel.from_pretrained(path)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
            image_processor = (
                image_processor if image_processor is not None else AutoImageProcessor.from_pretrained(path)
            )
        if args is None:
            args = self.config_class(output_dir=f"{type(model).__name__}-{self._name}", report_to="none")
        elif not isinstance(args, self.config_class):
            name = self.config_class.__name__
            raise MoEGRPOError(
                f"{type(self).__name__} needs a `{name}`, got `{type(args).__name__}`. Build one with the same "
                f"arguments: `{name}(**your_args.to_dict())`."
            )
        if tokenizer is None or image_processor is None:
            raise MoEGRPOError(
                f"{type(self).__name__} needs the model's `tokenizer` (for the class prompts) and `image_processor` "
                "(for the images): pass both, or pass the model as a folder that holds them."
            )
        if train_dataset is None:
            raise MoEGRPOError(f"{type(self).__name__} needs a `train_dataset` with `image` and `label` columns.")
        self.class_names = class_names_of(train_dataset, class_names)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.routing = RoutingController(vision_encoder(model))
        self._set_trainable(model, args.train_parameters)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=self._collate,
            processing_class=image_processor,
            **kwargs,
        )
        if self.args.world_size > 1:
            raise MoEGRPOError(
                f"{type(self).__name__} runs in one process (it calls the model's `get_image_features`, which a "
                "distributed wrapper does not forward); launch it without `accelerate launch`/`torchrun`."
            )
        self.model_accepts_loss_kwargs = False  # the loss is ours: Trainer divides it by the accumulation steps
        self.class_text = class_embeddings(self.model, tokenizer, self.class_names, args.class_template)
        coef = args.router_aux_loss_coef
        self.balance_loss_coef = float(model.config.vision_config.router_aux_loss_coef if coef is None else coef)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    # ------------------------------------------------------------------ set-up

    def _set_trainable(self, model, which: str) -> None:
        routers = {id(p) for p in self.routing.router_parameters()}
        for name, parameter in model.named_parameters():
            if which == "routers":
                parameter.requires_grad_(id(parameter) in routers)
            else:
                parameter.requires_grad_(name.startswith(("vision_model.", "visual_projection.")))

    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if rows and ("image" not in rows[0] or "label" not in rows[0]):
            raise MoEGRPOError(
                f"A training row has columns {sorted(rows[0])}; it needs `image` and `label`. Keep "
                "`remove_unused_columns=False` and rename the columns of your dataset."
            )
        return {
            "pixel_values": pixel_values(self.image_processor, [row["image"] for row in rows]),
            "labels": torch.tensor([int(row["label"]) for row in rows], dtype=torch.long),
        }

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.args.router_learning_rate is not None:
            routers = [p for p in self.routing.router_parameters() if p.requires_grad]
            set_router_learning_rate(optimizer, routers, self.args.router_learning_rate)
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        self.tokenizer.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

    # ------------------------------------------------------------------ shared loss parts

    def _stack(self, captures):
        adapters = self.routing.adapters
        log_probs = torch.stack([a.selection_log_probs(c.logits) for a, c in zip(adapters, captures)])
        dispatched = torch.stack([c.dispatched for c in captures])
        return log_probs, dispatched

    def _balance_loss(self, log_probs, dispatched, token_mask, active=None) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.balance_loss_coef)):
            return routed_load_balancing_loss(
                log_probs.exp(), dispatched, token_mask, self.routing.num_experts, active
            )

    def _log(self, mode: str, name: str, value) -> None:
        self._metrics[mode][name].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        metrics = {name: sum(values) / len(values) for name, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{name}": value for name, value in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Top-1 accuracy with the stock top-K routing on `eval_dataset` (a dataset, or a dict of named ones).

        Each dataset's classifier uses its own `ClassLabel` names when it has them, else the training classes.
        """
        datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if datasets is None:
            raise MoEGRPOError("No evaluation dataset: pass `eval_dataset=` to the trainer or to `evaluate`.")
        named = datasets if isinstance(datasets, dict) else {"": datasets}
        metrics = {}
        for name, dataset in named.items():
            features = getattr(dataset, "features", None)
            has_names = features is not None and getattr(features.get("label"), "names", None)
            accuracy = zero_shot_accuracy(
                self.model,
                self.tokenizer,
                self.image_processor,
                dataset,
                None if has_names else self.class_names,
                self.args.class_template,
            )
            metrics[f"{metric_key_prefix}_{name + '_' if name else ''}accuracy"] = accuracy
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class CLIPMoEGRPOTrainer(_CLIPClassificationTrainer):
    """MoE-GRPO for zero-shot image classification with a CLIP-MoE (see the module docstring).

    Args:
        model (`CLIPMoeModel` or `str`): the CLIP-MoE, or a folder holding it with its tokenizer and image processor.
        args ([`CLIPMoEGRPOConfig`], *optional*): the configuration.
        train_dataset (`datasets.Dataset`): rows with an `image` and an integer `label` column.
        eval_dataset (`datasets.Dataset` or `dict[str, datasets.Dataset]`, *optional*): for `evaluate`.
        tokenizer, image_processor: the model's (read from the folder when `model` is one).
        class_names (`list[str]`, *optional*): one per label, in label order; default: the `label` `ClassLabel`'s.
        **kwargs: passed on to `transformers.Trainer` (callbacks, optimizers...).
    """

    config_class = CLIPMoEGRPOConfig
    _name = "MoE-GRPO"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: CLIPMoEGRPOConfig = self.args
        mode = "train" if model.training else "eval"
        group = args.num_generations
        pixels = inputs["pixel_values"].repeat_interleave(group, dim=0)
        labels = inputs["labels"].repeat_interleave(group, dim=0)

        # 1. Rollouts: G sampled routings per image, recorded.
        with torch.no_grad(), self.routing.rollout("sample") as recording:
            rollout_logits = image_logits(model, pixels, self.class_text)
        trace = recording.steps[0]  # the encoder runs once: [rows, tokens, layers, top_k]
        rewards = classification_rewards(rollout_logits, labels)
        grouped = rewards.view(-1, group)
        advantages = group_advantages(grouped, args.scale_rewards).view(-1)

        # 2. The same routes replayed with gradients: exact probabilities of the sets that made each rollout.
        with self.routing.step_scope():
            self.routing.start_replay(trace)
            logits = image_logits(model, pixels, self.class_text)
            captures = self.routing.captures()
            self.routing.finish_replay()
        rows, tokens = trace.shape[:2]
        log_probs, dispatched = self._stack(captures)  # [layers, rows * tokens, experts], [layers, rows * tokens, K]
        set_lp = torch.stack(
            [set_log_prob(lp, c.recorded, args.set_log_prob) for lp, c in zip(log_probs, captures)]
        ).view(-1, rows, tokens)
        per_token = clipped_objective(
            set_lp - set_lp.detach(), advantages[None, :, None], args.loss_type, args.epsilon, args.epsilon_high
        ).mean(0)
        mask = captures[0].valid.view(rows, tokens).float()
        if args.gate_loss_tokens == "patches":
            mask[:, 0] = 0.0
        gate_loss = reduce_like_trl(per_token, mask, args.loss_type, 1.0, tokens, mask.sum().clamp(min=1.0))
        balance = self._balance_loss(log_probs, dispatched, captures[0].valid)
        loss = gate_loss + self.balance_loss_coef * balance

        with torch.no_grad():
            self._log(mode, "reward", rewards.mean())
            self._log(mode, "reward_std", grouped.std(dim=1).mean())
            self._log(mode, "frac_reward_zero_std", (grouped.std(dim=1) == 0).float().mean())
            self._log(mode, "replay_matches_rollout", (logits.argmax(-1) == rollout_logits.argmax(-1)).float().mean())
            self._log(mode, "routing/gate_loss", gate_loss)
            self._log(mode, "routing/balance_loss", balance)
            self._log(mode, "routing/entropy", gate_entropy(log_probs).mean())
            top_k = torch.stack([c.top_k for c in captures])
            differs = differs_from_top_k(dispatched, top_k, self.routing.num_experts)
            self._log(mode, "routing/sampled_differs_from_topk", differs.float().mean())
        return (loss, {"logits": logits}) if return_outputs else loss


class CLIPDetFTTrainer(_CLIPClassificationTrainer):
    """Det-FT for a CLIP-MoE: cross-entropy fine-tuning of the zero-shot classifier with top-K routing.

    Takes the same arguments as [`CLIPMoEGRPOTrainer`], with a [`CLIPDetFTConfig`].
    """

    config_class = CLIPDetFTConfig
    _name = "Det-FT"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        routing = self.args.train_routing if mode == "train" else "topk"
        with self.routing.training_routing(**training_routing_kwargs(self.args, routing)) as routes:
            logits = image_logits(model, inputs["pixel_values"], self.class_text)
            captures = routes.captures()
        ce = F.cross_entropy(logits, inputs["labels"].to(logits.device))
        log_probs = self._stack(captures)[0]
        dispatched, active = stacked_slots(captures)  # Expert Choice: each layer's own slot width
        balance = self._balance_loss(log_probs, dispatched, captures[0].valid, active)
        loss = ce + self.balance_loss_coef * balance
        with torch.no_grad():
            self._log(mode, "cross_entropy", ce)
            self._log(mode, "accuracy", (logits.argmax(-1) == inputs["labels"].to(logits.device)).float().mean())
            self._log(mode, "routing/balance_loss", balance)
        return (loss, {"logits": logits}) if return_outputs else loss
