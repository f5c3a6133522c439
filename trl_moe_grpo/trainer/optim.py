"""A learning rate of its own for the MoE routers.

Upcycled routers start near zero (e.g. std 0.02), so their logits are tiny and nearly uniform, and Adam moves each
weight by at most about the learning rate per step: at the small learning rates RL fine-tuning uses for the rest of the
model, the routing cannot move within a short run. `router_learning_rate` gives the router weights their own peak
learning rate; the scheduler (cosine, warm-up...) shapes it exactly as it shapes the others. `warm_up_routers` adds a
linear warm-up of the routers' own on top of it (`router_warmup_steps`): Adam's first steps move each weight by about
the learning rate whatever the gradient's size, which is noise until a signal accumulates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..errors import MoEGRPOError

# Marks the optimizer's param groups that hold router parameters (kept in the optimizer's state dict).
ROUTER_GROUP_KEY = "moe_routers"


def set_router_learning_rate(
    optimizer: torch.optim.Optimizer, router_parameters: Iterable[torch.nn.Parameter], learning_rate: float | None
) -> torch.optim.Optimizer:
    """Move `router_parameters` into param groups of their own with `learning_rate`; other options are kept.

    `learning_rate=None` keeps each group's learning rate (the groups are only split). Router groups are marked with
    `ROUTER_GROUP_KEY`, for `warm_up_routers`.

    Call it right after the optimizer is built, before its first step and before the scheduler reads the groups'
    learning rates. Returns `optimizer`, changed in place.
    """
    routers = {id(p) for p in router_parameters}
    if any(optimizer.state.values()):
        raise RuntimeError("set_router_learning_rate must run before the optimizer's first step.")
    groups = []
    for group in optimizer.param_groups:
        for is_router in (False, True):
            params = [p for p in group["params"] if (id(p) in routers) == is_router]
            if params:
                lr = {"lr": learning_rate} if is_router and learning_rate is not None else {}
                groups.append({**group, "params": params, **lr, ROUTER_GROUP_KEY: is_router})
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)
    return optimizer


def warm_up_routers(scheduler: torch.optim.lr_scheduler.LRScheduler, warmup_steps: int) -> None:
    """Multiply the learning rate of the router param groups by `min(1, step / warmup_steps)` (transformers' linear
    warm-up), on top of what `scheduler` does to them; other groups are untouched. Changes `scheduler` in place.

    The groups must have been split with `set_router_learning_rate` (they carry `ROUTER_GROUP_KEY`). `scheduler` must
    be a `LambdaLR` (every `lr_scheduler_type` of transformers but `reduce_lr_on_plateau`): its per-group factors
    are wrapped. The wrappers are closures, which `LambdaLR.state_dict` does not save: a resumed run rebuilds them
    from the config, and the step count it restores gives the same factors.
    """
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise MoEGRPOError(
            f"`router_warmup_steps` shapes the routers' factor of a LambdaLR scheduler, but the scheduler is a "
            f"`{type(scheduler).__name__}`. Use an `lr_scheduler_type` other than 'reduce_lr_on_plateau', or set "
            "`router_warmup_steps=0`."
        )
    if warmup_steps <= 0:
        return
    groups = scheduler.optimizer.param_groups
    routers = [i for i, group in enumerate(groups) if group.get(ROUTER_GROUP_KEY)]
    if not routers:
        raise MoEGRPOError("No optimizer param group holds the routers: call `set_router_learning_rate` first.")

    def warmed_up(factor: Callable[[int], float]) -> Callable[[int], float]:
        def router_factor(step: int) -> float:
            return factor(step) * min(1.0, step / warmup_steps)

        return router_factor

    for i in routers:
        scheduler.lr_lambdas[i] = warmed_up(scheduler.lr_lambdas[i])
        # The scheduler already set the learning rates of step `last_epoch` with the old factor.
        groups[i]["lr"] = scheduler.base_lrs[i] * scheduler.lr_lambdas[i](scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
