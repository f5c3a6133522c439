"""A learning rate of its own for the MoE routers.

Upcycled routers start near zero (e.g. std 0.02), so their logits are tiny and nearly uniform, and Adam moves each
weight by at most about the learning rate per step: at the small learning rates RL fine-tuning uses for the rest of the
model, the routing cannot move within a short run. `router_learning_rate` gives the router weights their own peak
learning rate; the scheduler (cosine, warm-up...) shapes it exactly as it shapes the others.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def set_router_learning_rate(
    optimizer: torch.optim.Optimizer, router_parameters: Iterable[torch.nn.Parameter], learning_rate: float
) -> torch.optim.Optimizer:
    """Move `router_parameters` into param groups of their own with `learning_rate`; other options are kept.

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
                groups.append({**group, "params": params, **({"lr": learning_rate} if is_router else {})})
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)
    return optimizer
