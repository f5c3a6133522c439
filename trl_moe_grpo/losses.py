"""The routing losses of MoE-GRPO: probability of a chosen expert set, Gate-GRPO, load balancing on routed sets.

All functions are pure tensor math (`docs/design.md` §2); the trainer feeds them what the routing controller captured.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch

SetLogProb = Literal["set", "ordered"]

# The exact unordered-set probability sums over K! orders; past this K the recorded order is scored instead.
MAX_TOP_K_FOR_SET = 4


def _masked_logsumexp(log_probs: torch.Tensor, experts: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
    """`log(sum of p over all experts except experts[..., positions])`, stable even when the rest is tiny."""
    if not positions:
        return torch.logsumexp(log_probs, dim=-1)
    excluded = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, experts[..., list(positions)], True)
    return torch.logsumexp(log_probs.masked_fill(excluded, float("-inf")), dim=-1)


def set_log_prob(log_probs: torch.Tensor, experts: torch.Tensor, method: SetLogProb = "set") -> torch.Tensor:
    """Log-probability that sampling without replacement from `p` draws the expert set `experts`.

    Args:
        log_probs (`torch.Tensor`):
            `[..., num_experts]` log of the selection distribution (masked experts at `-inf`).
        experts (`torch.Tensor`):
            `[..., k]` distinct expert ids, in drawn order.
        method (`str`):
            `"set"`: the unordered set, the Plackett-Luce marginal
            `sum over orders of prod_j p[s_j] / (1 - sum_{i<j} p[s_i])`, for `k <= 4` (larger `k` falls back to
            `"ordered"`). `"ordered"`: the recorded order only. Both are exact probabilities of an action.

    Returns:
        `torch.Tensor`: `[...]` float32 log-probabilities.
    """
    if method not in ("set", "ordered"):
        raise ValueError(f"Unknown set log-probability method {method!r}: use 'set' or 'ordered'.")
    log_probs = log_probs.float()
    experts = experts.long()
    k = experts.shape[-1]
    chosen = log_probs.gather(-1, experts)  # [..., k]
    remaining: dict[tuple[int, ...], torch.Tensor] = {}  # log(1 - mass already drawn), per drawn subset

    def ordered(order: tuple[int, ...]) -> torch.Tensor:
        terms = []
        for i, j in enumerate(order):
            drawn = tuple(sorted(order[:i]))
            if drawn not in remaining:
                remaining[drawn] = _masked_logsumexp(log_probs, experts, drawn)
            terms.append(chosen[..., j] - remaining[drawn])
        return torch.stack(terms, dim=-1).sum(-1)

    if method == "ordered" or k == 1 or k > MAX_TOP_K_FOR_SET:
        return ordered(tuple(range(k)))
    return torch.logsumexp(torch.stack([ordered(p) for p in itertools.permutations(range(k))], dim=-1), dim=-1)


def clipped_objective(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
) -> torch.Tensor:
    """Per-action policy loss of TRL's `loss_type`, for actions with log importance ratio `log_ratio`.

    This is TRL's token objective (`GRPOTrainer._compute_loss`) applied to any action; Gate-GRPO applies it to the
    expert set each layer chose for each token. `advantages` broadcasts against `log_ratio`.
    """
    ratio = torch.exp(log_ratio)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            ratio = torch.clamp(ratio, max=delta)
        return -torch.min(ratio * advantages, clipped * advantages)
    if loss_type == "sapo":
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        return -torch.sigmoid(temperatures * (ratio - 1)) * 4 / temperatures * advantages
    raise ValueError(f"Gate-GRPO has no objective for loss_type={loss_type!r}; supported: {GATE_LOSS_TYPES}.")


GATE_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "sapo")


def reduce_like_trl(
    per_position: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    accumulation_steps: float,
    max_length: int,
    dapo_normalizer: torch.Tensor | float,
) -> torch.Tensor:
    """Average a `[batch, positions]` loss the way TRL normalizes its token loss for `loss_type`.

    Args:
        per_position (`torch.Tensor`): `[batch, positions]` loss.
        mask (`torch.Tensor`): `[batch, positions]` 1 where the position counts.
        loss_type (`str`): TRL's `loss_type`.
        accumulation_steps (`float`): gradient-accumulation steps of this micro-batch (1 in eval).
        max_length (`int`): the constant length `dr_grpo` divides by.
        dapo_normalizer (`torch.Tensor | float`): positions per accumulation window, for `dapo`.
    """
    mask = mask.to(per_position.dtype)
    if loss_type in ("grpo", "sapo"):
        return ((per_position * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation_steps
    if loss_type == "bnpo":
        return (per_position * mask).sum() / mask.sum().clamp(min=1.0) / accumulation_steps
    if loss_type == "dr_grpo":
        return (per_position * mask).sum() / (per_position.size(0) * max_length) / accumulation_steps
    if loss_type == "dapo":
        return (per_position * mask).sum() / dapo_normalizer
    raise ValueError(f"Gate-GRPO has no normalization for loss_type={loss_type!r}; supported: {GATE_LOSS_TYPES}.")


def expert_load(
    dispatched: torch.Tensor, token_mask: torch.Tensor, num_experts: int, active: torch.Tensor | None = None
) -> torch.Tensor:
    """`[layers, num_experts]` number of routed slots each expert got, over the tokens where `token_mask` is 1.

    Args:
        dispatched (`torch.Tensor`): `[layers, rows, top_k]` expert ids the tokens were dispatched to. Ids of masked
            rows are never read (they may be `-1`).
        token_mask (`torch.Tensor`): `[rows]` 1 for tokens that count.
        num_experts (`int`): N.
        active (`torch.Tensor`, *optional*): `[layers, rows, top_k]` bool, the slots that carry weight (`None`: all).
    """
    weight = token_mask.bool()
    load = torch.zeros(dispatched.shape[0], num_experts, device=dispatched.device)
    for layer in range(dispatched.shape[0]):  # one layer at a time: a trace can be large
        ids = dispatched[layer][weight].long()
        slots = torch.ones_like(ids, dtype=load.dtype) if active is None else active[layer][weight].to(load.dtype)
        load[layer].scatter_add_(0, ids.reshape(-1), slots.reshape(-1))
    return load


def balance_loss_given_load(
    probs: torch.Tensor, token_mask: torch.Tensor, load_fraction: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Sum over the unmasked tokens of their share of the Switch loss, for a fixed expert load.

    `N * mean over layers of sum_e f_e * sum_t p_t,e`: divided by the number of tokens the load `f` was counted over,
    this is the Switch loss `N sum_e f_e P_e`. `f` carries no gradient (it counts discrete choices), so the loss is
    linear in the tokens: the loss of a batch is the sum of its parts' losses when every part uses the batch's `f`.

    Args:
        probs (`torch.Tensor`): `[layers, rows, num_experts]` selection probabilities.
        token_mask (`torch.Tensor`): `[rows]` 1 for tokens that count.
        load_fraction (`torch.Tensor`): `[layers, num_experts]` routed slots per token of each expert (sums to top_k
            per layer when every slot counts).
        num_experts (`int`): N.
    """
    prob_sum = (probs * token_mask.to(probs.dtype)[None, :, None]).sum(1)  # [layers, N]
    return num_experts * (load_fraction.to(probs.dtype) * prob_sum).sum(-1).mean()


def routed_load_balancing_loss(
    probs: torch.Tensor,
    dispatched: torch.Tensor,
    token_mask: torch.Tensor,
    num_experts: int,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-style load-balancing loss on the experts the tokens were actually sent to.

    Per layer `N * sum_e f_e * P_e`, with `f_e` the number of routed slots that went to expert `e` per token and `P_e`
    the mean selection probability of `e`, over the unmasked tokens; averaged over layers. At a perfectly balanced
    router it equals `top_k`, the scale of transformers' `load_balancing_loss_func`, so the models'
    `router_aux_loss_coef` keeps its meaning. (transformers pools the layers' loads and probabilities before the
    product; with one MoE layer and top-K dispatch the two are equal.)

    Args:
        probs (`torch.Tensor`): `[layers, rows, num_experts]` selection probabilities.
        dispatched (`torch.Tensor`): `[layers, rows, top_k]` expert ids the tokens were dispatched to.
        token_mask (`torch.Tensor`): `[rows]` 1 for tokens that count (not padding).
        num_experts (`int`): N.
        active (`torch.Tensor`, *optional*): `[layers, rows, top_k]` bool, the slots that carry weight. Expert Choice
            routing gives some tokens fewer than top_k experts; their free slots hold placeholder ids with weight 0,
            which are no load. `None`: every slot counts.
    """
    count = token_mask.to(probs.dtype).sum().clamp(min=1.0)
    fraction = expert_load(dispatched, token_mask, num_experts, active).to(probs.dtype) / count
    return balance_loss_given_load(probs, token_mask, fraction, num_experts) / count
