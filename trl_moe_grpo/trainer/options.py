"""The checks of the router options every MoE config shares, written once.

`MoEGRPOConfig`, `MoESFTConfig` and the CLIP-MoE configs (`clip_moe/config.py`) all call `check_router_options` from
their `__post_init__`; the configs with a training-forward routing (`MoESFTConfig`, `CLIPDetFTConfig`) also call
`check_training_routing_options`. The trainers call `refuse_reentrant_checkpointing` again once TRL's `__init__` ran,
since TRL can switch reentrant checkpointing on after the config's check.
"""

from __future__ import annotations

from typing import Any

from ..errors import MoEGRPOError
from ..routing.controller import TRAINING_ROUTINGS

_REENTRANT_FIX = "Use `gradient_checkpointing_kwargs={'use_reentrant': False}` (TRL's default)."


def refuse_reentrant_checkpointing(
    args: Any, cause: str = "`gradient_checkpointing_kwargs` sets `use_reentrant=True`. ", fix: str = _REENTRANT_FIX
) -> None:
    """Raise if `args` turn on reentrant gradient checkpointing.

    Reentrant checkpointing runs the forward without autograd, so neither the gate loss nor the load-balancing loss
    would reach the routers. `cause` (a sentence) says how it came to be on, `fix` what to do instead.
    """
    if getattr(args, "gradient_checkpointing", False) and (args.gradient_checkpointing_kwargs or {}).get(
        "use_reentrant"
    ):
        raise MoEGRPOError(
            f"{cause}Reentrant gradient checkpointing runs the forward without autograd, so "
            f"the routers' probabilities would get no gradient from the routing losses. {fix}"
        )


def check_router_options(args: Any) -> None:
    """The router options every MoE config has: `router_learning_rate` and `router_aux_loss_coef` must be >= 0 (or
    `None`), and Liger kernels and reentrant gradient checkpointing, which bypass or blind the router hooks, are
    refused. Options a config does not have are skipped."""
    router_lr = getattr(args, "router_learning_rate", None)
    if router_lr is not None and router_lr < 0:
        raise MoEGRPOError(
            f"`router_learning_rate` must be >= 0, got {router_lr}; `None` gives the routers `learning_rate`."
        )
    balance = getattr(args, "router_aux_loss_coef", None)
    if balance is not None and balance < 0:
        raise MoEGRPOError(f"`router_aux_loss_coef` must be >= 0, got {balance}; 0 turns the load-balancing loss off.")
    if getattr(args, "use_liger_kernel", False):
        raise MoEGRPOError(
            "`use_liger_kernel=True` swaps the model's layers for Liger kernels, which bypass the router hooks the "
            "MoE trainers rely on. Set `use_liger_kernel=False`."
        )
    refuse_reentrant_checkpointing(args)


def check_training_routing_options(args: Any) -> None:
    """The options of a training-forward routing (`train_routing` and its settings `routing_noise_std` (`None`:
    V-MoE's `1 / num_experts`), `expert_capacity_factor`, `sinkhorn_iterations`), as
    `RoutingController.training_routing` takes them."""
    if args.train_routing not in TRAINING_ROUTINGS:
        raise MoEGRPOError(f"`train_routing={args.train_routing!r}` is not one of {TRAINING_ROUTINGS}.")
    if args.routing_noise_std is not None and args.routing_noise_std <= 0:
        raise MoEGRPOError(
            f"`routing_noise_std` must be positive, got {args.routing_noise_std}. For noise-free routing use "
            "`train_routing='topk'`."
        )
    if args.expert_capacity_factor <= 0:
        raise MoEGRPOError(
            f"`expert_capacity_factor` must be positive, got {args.expert_capacity_factor}; 1.0 fills as many "
            "expert slots as top-K routing."
        )
    if args.sinkhorn_iterations < 1:
        raise MoEGRPOError(
            f"`sinkhorn_iterations` must be at least 1, got {args.sinkhorn_iterations}; with none, Sinkhorn "
            "routing is top-K routing (use `train_routing='topk'`)."
        )


def training_routing_kwargs(args: Any, mode: str) -> dict[str, Any]:
    """The arguments of `RoutingController.training_routing` for routing `mode` under the config `args`."""
    return dict(
        mode=mode,
        noise_std=args.routing_noise_std,
        noisy_mixing_weights=args.noisy_mixing_weights,
        capacity_factor=args.expert_capacity_factor,
        sinkhorn_iterations=args.sinkhorn_iterations,
    )
