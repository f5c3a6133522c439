"""The classification reward of MoE-GRPO and GRPO's group-relative advantages."""

from __future__ import annotations

import torch

from ..errors import MoEGRPOError

SCALE_REWARDS = ("group", "batch", "none")


def classification_rewards(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`1.0` where the zero-shot prediction (arg-max of `logits`, `[rows, classes]`) is the label, else `0.0`."""
    if logits.shape[0] != labels.shape[0]:
        raise MoEGRPOError(f"{logits.shape[0]} predictions for {labels.shape[0]} labels.")
    return (logits.argmax(-1) == labels.to(logits.device)).float()


def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages of `[groups, G]` rewards: reward minus its group's mean, scaled as TRL's `scale_rewards`.

    `"group"` divides by the group's standard deviation (GRPO), `"batch"` by the batch's, `"none"` not at all (Dr.
    GRPO). A group whose rollouts all got the same reward has advantage 0 whatever the scaling.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise MoEGRPOError(
            f"Rewards have shape {tuple(rewards.shape)}; group-relative advantages need [groups, G] with G >= 2."
        )
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        return centered / (rewards.std(dim=1, keepdim=True) + eps)
    if scale_rewards == "batch":
        return centered / (rewards.std() + eps)
    if scale_rewards == "none":
        return centered
    raise MoEGRPOError(f"scale_rewards={scale_rewards!r}: use one of {SCALE_REWARDS}.")
