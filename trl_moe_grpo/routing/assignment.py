"""Batch-level routings for the comparison experiments: Expert Choice and Sinkhorn-balanced assignment.

Token-choice routings (top-K, sampling, noisy top-K) decide each token on its own. The two routings here decide a
layer's whole batch at once, which is why they balance the experts' loads by construction:

- **Expert Choice** (Zhou et al., 2022): every expert picks the `C` tokens it scores highest, with capacity
  `C = ceil(capacity_factor * tokens * top_k / num_experts)`, so every expert's load is exactly `C`. A token keeps
  every expert that picked it, any number from none to all.
- **Sinkhorn** (optimal-transport routing, as in BASE / S-BASE layers): a few Sinkhorn iterations rescale the
  token-expert score matrix towards equal expert marginals; each token then takes the top-K of the balanced scores.
  What is balanced is the *probability mass* each expert receives over the batch (the matrix's column sums), not the
  count of tokens each expert is dispatched to: the final top-K is taken per token, so the dispatched loads are
  only approximately equal. BASE layers solve the assignment itself (an auction algorithm, one expert per token).

Because a token's experts depend on the other tokens of the batch, later ones included, these are *training-time*
routings only: a causal model cannot route that way while decoding, so evaluation and inference use the stock top-K.

Both functions are pure tensor math on `[rows, num_experts]` scores (the router's selection log-probabilities) with an
optional `[rows]` token mask: masked rows (padding) neither take capacity nor carry mass, and what they are given back
is only a placeholder. Every returned id lies in `[0, num_experts)`, so it can go to transformers' experts kernels as
is (they read the number of slots per token from the ids' shape).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class ExpertChoiceAssignment(NamedTuple):
    """The result of `expert_choice`: every token's choosing experts, in a slot layout as wide as the widest token.

    Expert kernels take the same number of expert ids for every token, while under Expert Choice a token is taken by
    any number of experts, none included. The layout is therefore `width` slots per token, `width` the largest number
    of experts that chose any token of the batch (at least 1); a token chosen by fewer fills its remaining slots with
    placeholders, valid expert ids the caller gives weight exactly 0.

    Attributes:
        indices (`torch.Tensor`):
            `[rows, width]` int64 distinct expert ids per row, all in `[0, num_experts)`. The experts that chose the
            token come first (highest selection score first); the remaining slots hold the token's best-scored
            experts that did not choose it, as placeholders.
        active (`torch.Tensor`):
            `[rows, width]` bool: the slot holds an expert that chose the token. Always a prefix of the row, of length
            `num_choices`.
        num_choices (`torch.Tensor`):
            `[rows]` int64: how many experts chose the token (0 for masked rows). A token with 0 is dropped (the
            residual connection passes it through).
        capacity (`int`):
            `C`, the number of tokens each expert picked (fewer only where an expert had fewer finite scores).
    """

    indices: torch.Tensor
    active: torch.Tensor
    num_choices: torch.Tensor
    capacity: int


def _row_mask(scores: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    if scores.dim() != 2:
        raise ValueError(f"Routing scores must be [rows, num_experts], got shape {tuple(scores.shape)}.")
    if token_mask is None:
        return torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    if token_mask.shape != scores.shape[:1]:
        raise ValueError(f"Token mask has shape {tuple(token_mask.shape)}, expected ({scores.shape[0]},).")
    return token_mask.to(device=scores.device, dtype=torch.bool)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens per expert under Expert Choice: `ceil(capacity_factor * num_tokens * top_k / num_experts)`.

    Capped at `num_tokens` (an expert cannot pick a token twice). With `capacity_factor=1` the experts fill, in total,
    as many slots as top-K routing would.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}.")
    # Round before ceil so float noise (1.0000000002) does not add a slot.
    return min(num_tokens, math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9)))


def expert_choice(
    scores: torch.Tensor, top_k: int, capacity_factor: float = 1.0, token_mask: torch.Tensor | None = None
) -> ExpertChoiceAssignment:
    """Expert Choice routing (Zhou et al., 2022): each expert picks its top-`C` tokens among the unmasked rows.

    A token keeps every expert that picked it, 0 to `num_experts` of them; the slot layout is as wide as the token
    with the most (see [`ExpertChoiceAssignment`]). Each expert's load is exactly `C` (fewer only where it has fewer
    finite scores than `C`).

    Args:
        scores (`torch.Tensor`):
            `[rows, num_experts]` selection scores, e.g. log-probabilities (any monotone transform of the selection
            probability ranks tokens the same way). `-inf` entries are never picked.
        top_k (`int`):
            The model's `num_experts_per_tok`: sets the capacity, so that on average a token gets `top_k` experts at
            `capacity_factor=1`.
        capacity_factor (`float`, *optional*, defaults to `1.0`):
            Scales the capacity `C = ceil(capacity_factor * tokens * top_k / num_experts)`, `tokens` being the number
            of unmasked rows.
        token_mask (`torch.Tensor`, *optional*):
            `[rows]` truthy for tokens that take part (not padding). `None`: every row does.

    Returns:
        [`ExpertChoiceAssignment`]: ids, active slots, choice counts and the capacity.
    """
    valid = _row_mask(scores, token_mask)
    rows, num_experts = scores.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}.")
    scores = scores.detach().float()
    masked = scores.masked_fill(~valid[:, None], float("-inf"))
    capacity = expert_capacity(int(valid.sum()), top_k, num_experts, capacity_factor)
    chosen = torch.zeros(rows, num_experts, dtype=torch.bool, device=scores.device)
    if capacity > 0:
        picked = masked.topk(capacity, dim=0).indices  # [C, num_experts]: each expert's best rows
        chosen.scatter_(0, picked, True)
        chosen &= torch.isfinite(masked)  # a -inf score (padding, or an expert masked out) is never a real pick
    num_choices = chosen.sum(-1)
    width = max(1, int(num_choices.max())) if rows else 1

    # Rank within a row: chosen experts first, each group by score (two stable sorts, so no tie or rounding can mix
    # the groups); masked rows rank by their own scores (placeholders only).
    by_score = scores.nan_to_num(nan=float("-inf")).argsort(dim=-1, descending=True, stable=True)
    chosen_first = (~chosen.gather(-1, by_score)).to(torch.uint8).argsort(dim=-1, stable=True)
    indices = by_score.gather(-1, chosen_first)[:, :width]
    active = chosen.gather(-1, indices)
    return ExpertChoiceAssignment(indices, active, num_choices, capacity)


def sinkhorn_log_scores(
    log_scores: torch.Tensor, iterations: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sinkhorn-balance the unmasked rows of `exp(log_scores)` towards equal expert marginals, in log space.

    Each iteration first normalizes every token's row to total mass `1 / tokens`, then every expert's column to total
    mass `1 / num_experts`; after at least one iteration the experts' marginals are exactly equal and the rows
    approximately so. Normalizing rows first makes the result independent of per-token constants in `log_scores`
    (so router logits and their log-softmax balance identically). Masked rows are left out of the marginals and
    returned unchanged.

    Args:
        log_scores (`torch.Tensor`): `[rows, num_experts]` log-scores (router logits or log selection probabilities).
        iterations (`int`): Number of Sinkhorn iterations; `0` returns the scores unchanged.
        token_mask (`torch.Tensor`, *optional*): `[rows]` truthy for tokens that take part; `None`: all rows.

    Returns:
        `torch.Tensor`: `[rows, num_experts]` float32 balanced log-scores (masked rows: the input, as float32).
    """
    valid = _row_mask(log_scores, token_mask)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}.")
    result = log_scores.detach().float().clone()
    balanced = result[valid]
    num_tokens, num_experts = balanced.shape
    if num_tokens == 0 or iterations == 0:
        return result

    def normalized(x: torch.Tensor, dim: int, log_total: float) -> torch.Tensor:
        lse = torch.logsumexp(x, dim=dim, keepdim=True)
        # A row or column with no finite entry stays -inf instead of turning into NaN.
        return x - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) + log_total

    for _ in range(iterations):
        balanced = normalized(balanced, 1, -math.log(num_tokens))
        balanced = normalized(balanced, 0, -math.log(num_experts))
    result[valid] = balanced
    return result


def sinkhorn_top_k(
    log_scores: torch.Tensor, top_k: int, iterations: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Each token's top-`top_k` experts under the Sinkhorn-balanced scores (see `sinkhorn_log_scores`).

    The balancing equalizes the probability mass each expert gets over the batch, not the number of tokens it is
    dispatched to: the top-K is then taken per token, so dispatched loads are close to, but not exactly, equal.

    Returns:
        `torch.Tensor`: `[rows, top_k]` int64 distinct expert ids in `[0, num_experts)`, highest balanced score first.
        Masked rows get the top-`top_k` of their own scores (placeholders).
    """
    if not 1 <= top_k <= log_scores.shape[-1]:
        raise ValueError(f"top_k must be in [1, {log_scores.shape[-1]}], got {top_k}.")
    balanced = sinkhorn_log_scores(log_scores, iterations, token_mask)
    return balanced.nan_to_num(nan=float("-inf")).topk(top_k, dim=-1).indices
