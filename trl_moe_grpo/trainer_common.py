"""What both MoE trainers (`MoEGRPOTrainer`, `MoESFTTrainer`) add to their TRL trainer in the same way."""

from __future__ import annotations

import torch

from .optim import set_router_learning_rate
from .routing import RoutingController


class MoETrainerMixin:
    """Shared parts of the MoE trainers: the model the routing controller sits on, the routers' own learning rate,
    the load-balancing loss taken over from TRL, and metric logging. Mixed in before the TRL trainer class."""

    routing: RoutingController

    @property
    def routing_model(self):
        """The model the routing controller is installed on (the base model under PEFT)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.args.router_learning_rate is not None:
            set_router_learning_rate(optimizer, self.routing.router_parameters(), self.args.router_learning_rate)
        return optimizer

    def _take_over_balance_loss(self, *models) -> None:
        """Compute the load-balancing loss ourselves, on the experts the tokens were dispatched to.

        TRL's own MoE auxiliary loss (`aux_loss_enabled`) scores a fresh top-K of the logits instead of the routes
        taken and, for vision-language models, crashes on outputs without `router_logits` (TRL 1.16). Its coefficient
        as TRL resolved it (the config's, else the model's) is kept as `balance_loss_coef`.
        """
        self.balance_loss_coef = float(self.router_aux_loss_coef or 0.0)
        self.aux_loss_enabled = False
        for model in models:
            if model is not None and hasattr(model.config.get_text_config(), "output_router_logits"):
                model.config.get_text_config().output_router_logits = False

    def _log_mean(self, mode: str, name: str, value: torch.Tensor) -> None:
        self._metrics[mode][name].append(self.accelerator.gather(value.detach().reshape(1)).float().mean().item())

    def _log_masked_mean(self, mode: str, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        mask = mask.float()
        totals = self.accelerator.reduce(torch.stack([(values * mask).sum(), mask.sum()]), reduction="sum")
        self._metrics[mode][name].append((totals[0] / totals[1].clamp(min=1.0)).item())
