"""What both MoE trainers (`MoEGRPOTrainer`, `MoESFTTrainer`) add to their TRL trainer in the same way."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from ..errors import MoEGRPOError
from ..routing import RoutingController, find_routers
from .optim import set_router_learning_rate, warm_up_routers
from .options import refuse_reentrant_checkpointing

logger = logging.get_logger(__name__)


def user_router_logits_flag(model: Any, args: Any) -> bool | None:
    """The `output_router_logits` the user's model comes with, read before a TRL trainer may change it.

    TRL's `SFTTrainer` rewrites the flag to match its auxiliary loss; the MoE trainers switch it off. What they save
    keeps this value. `model` is a model or a model id / path (whose config is then read, as TRL will load it).
    """
    if not isinstance(model, str):
        return getattr(model.config.get_text_config(), "output_router_logits", None)
    init_kwargs = args.model_init_kwargs or {}
    if "output_router_logits" in init_kwargs:
        return init_kwargs["output_router_logits"]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        model,
        revision=init_kwargs.get("revision"),
        trust_remote_code=init_kwargs.get("trust_remote_code", args.trust_remote_code),
    )
    return getattr(config.get_text_config(), "output_router_logits", None)


def resolve_args(model: Any, args: Any, config_class: type, trainer_name: str, suffix: str) -> Any:
    """`args` checked to be a `config_class`, or a default one named after the model (`<model>-<suffix>`)."""
    if args is not None and not isinstance(args, config_class):
        name = config_class.__name__
        raise MoEGRPOError(
            f"{trainer_name} needs an `{name}`, got `{type(args).__name__}`. Build one with the same arguments: "
            f"`{name}(**your_args.to_dict())` keeps every option."
        )
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
        args = config_class(f"{str(name).split('/')[-1]}-{suffix}")
    return args


def repair_backbone_lookup(model: Any) -> None:
    """Point `model.base_model` at the decoder where the class's `base_model_prefix` names no attribute.

    TRL's fused LM head runs `model.base_model` and reads its `last_hidden_state`. A few causal LMs declare a prefix
    they do not have (transformers 5.25's `Llama4ForCausalLM` says `"language_model"` but holds `model`), so
    `base_model` falls back to the model itself and the head receives logits, not hidden states (`AttributeError:
    ... last_hidden_state`). The prefix is set on this instance only, after loading (loading is where the prefix
    maps checkpoint keys), and only when `model.model` is the decoder it should have named.
    """
    backbone = getattr(model, "model", None)
    if model.base_model is model and isinstance(backbone, PreTrainedModel):
        model.base_model_prefix = "model"


def _strip_base_layers(name: str) -> str:
    """A router's name without the `.base_layer` segments PEFT adds when it wraps the router."""
    return re.sub(r"(\.base_layer)+$", "", name)


def router_weight_names(model: Any, args: Any) -> list[str]:
    """Names of the routers' weight parameters in `model`, a model or a model id / path.

    For a model id the model is built on the meta device from its config (nothing is loaded), to find the routers by
    class as the routing controller will.
    """
    if isinstance(model, str):
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        init_kwargs = args.model_init_kwargs or {}
        config = AutoConfig.from_pretrained(
            model,
            revision=init_kwargs.get("revision"),
            trust_remote_code=init_kwargs.get("trust_remote_code", args.trust_remote_code),
        )
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        with torch.device("meta"):
            model = (
                model_class._from_config(config)
                if model_class is not None
                else AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
            )
    return [f"{name}.weight" for name, _, _ in find_routers(model)]


def peft_config_training_routers(peft_config: Any, model: Any, args: Any) -> Any:
    """`peft_config` extended so the adapter trains the MoE routers, which LoRA's `target_modules` cannot reach.

    transformers' routers are not `nn.Linear` layers: LoRA's `target_modules` skips them, and PEFT's `modules_to_save`
    would put a second copy of each router next to the original, which the routing controller cannot tell apart. The
    routers' weights are therefore added to `target_parameters`: each router gets a LoRA update of the adapter's rank
    (zero at start, so the reference model is the base model), saved with the adapter. Returns a copy; `peft_config`
    is not changed. Non-LoRA configs are returned as they are (the trainer then checks that some router is trainable).
    """
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        return peft_config
    routers = router_weight_names(model, args)
    module_names = {name.removesuffix(".weight") for name in routers}
    suffixes = {name.rsplit(".", 1)[-1] for name in module_names}
    to_save = set(peft_config.modules_to_save or [])
    if any(entry in suffixes or entry in module_names for entry in to_save):
        raise MoEGRPOError(
            f"`modules_to_save={sorted(to_save)}` lists the MoE routers: PEFT would keep a second copy of each "
            "router, which the routing controller cannot tell apart from the original. Leave the routers out of "
            "`modules_to_save`; the trainer trains them with a LoRA on their weights (`target_parameters`)."
        )
    targeted = list(peft_config.target_parameters or [])
    added = [name for name in routers if not any(name == t or name.endswith(f".{t}") for t in targeted)]
    if not added:
        return peft_config
    peft_config = copy.deepcopy(peft_config)
    peft_config.target_parameters = targeted + added
    logger.warning(
        f"The LoRA adapter also trains the MoE routers: their {len(added)} weights were added to the LoRA config's "
        f"`target_parameters` (a rank-{peft_config.r} update each), since LoRA's `target_modules` cannot reach them."
    )
    return peft_config


class MoETrainerMixin:
    """Shared parts of the MoE trainers: the model the routing controller sits on, the routers' own learning rate,
    the load-balancing loss taken over from TRL, and metric logging. Mixed in before the TRL trainer class."""

    routing: RoutingController

    @property
    def routing_model(self):
        """The model the routing controller is installed on (the base model under PEFT)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def router_trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters that move the routers: their own weights, or under PEFT the adapter on them."""
        prefixes = tuple(f"{_strip_base_layers(name)}." for name in self.routing.layer_names)
        return [p for n, p in self.routing_model.named_parameters() if p.requires_grad and n.startswith(prefixes)]

    def _refuse_reentrant_checkpointing(self) -> None:
        """The configs refuse reentrant checkpointing, but TRL turns it on after their check for PEFT models under
        DeepSpeed ZeRO-3 (trl#2514): refuse it again once TRL's `__init__` ran."""
        refuse_reentrant_checkpointing(
            self.args,
            cause="Gradient checkpointing is reentrant (`use_reentrant=True`): TRL forces it for PEFT models under "
            "DeepSpeed ZeRO-3 (trl#2514). ",
            fix="Set `gradient_checkpointing=False`, use ZeRO-2, or train without PEFT.",
        )

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.args.router_learning_rate is not None or getattr(self.args, "router_warmup_steps", 0):
            set_router_learning_rate(optimizer, self.router_trainable_parameters(), self.args.router_learning_rate)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The scheduler of the Trainer, plus the routers' own linear warm-up (`router_warmup_steps`)."""
        warmup = getattr(self.args, "router_warmup_steps", 0)
        built = self.lr_scheduler is not None  # transformers builds it once; wrap it once
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if warmup and not built:
            warm_up_routers(scheduler, warmup)
        return scheduler

    def _take_over_balance_loss(self, policy, *others, policy_flag: bool | None = None) -> None:
        """Compute the load-balancing loss ourselves, on the experts the tokens were dispatched to.

        TRL's own MoE auxiliary loss (`aux_loss_enabled`) scores a fresh top-K of the logits instead of the routes
        taken and, for vision-language models, crashes on outputs without `router_logits` (TRL 1.16). Its coefficient
        as TRL resolved it (the config's, else the model's) is kept as `balance_loss_coef`.

        The models' `output_router_logits` is switched off while training; `policy_flag` (default: the policy's
        current value) is what `_save` writes into the saved config, so a saved model keeps the user's setting.
        """
        self.balance_loss_coef = float(self.router_aux_loss_coef or 0.0)
        self.aux_loss_enabled = False
        self._saved_router_logits: list[tuple[Any, bool]] = []
        for model in (policy, *others):
            config = None if model is None else model.config.get_text_config()
            if config is None or not hasattr(config, "output_router_logits"):
                continue
            if model is policy:
                value = config.output_router_logits if policy_flag is None else policy_flag
                self._saved_router_logits.append((config, value))
            config.output_router_logits = False

    @contextlib.contextmanager
    def _users_router_logits_flag(self) -> Iterator[None]:
        """The user's `output_router_logits` in the policy's config while open (for saving), off again after."""
        saved = getattr(self, "_saved_router_logits", [])
        for config, value in saved:
            config.output_router_logits = value
        try:
            yield
        finally:
            for config, _ in saved:
                config.output_router_logits = False

    def _save(self, output_dir: str | None = None, state_dict=None):
        with self._users_router_logits_flag():
            super()._save(output_dir, state_dict)

    def _log_mean(self, mode: str, name: str, value: torch.Tensor) -> None:
        self._metrics[mode][name].append(self.accelerator.gather(value.detach().reshape(1)).float().mean().item())

    def _log_masked_mean(self, mode: str, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        mask = mask.float()
        totals = self.accelerator.reduce(torch.stack([(values * mask).sum(), mask.sum()]), reduction="sum")
        self._metrics[mode][name].append((totals[0] / totals[1].clamp(min=1.0)).item())
