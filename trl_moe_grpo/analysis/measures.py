"""The routing measures, one definition each, shared by the trainers' metrics and `analyze-routing`.

Pure functions on tensors; every logarithm is natural, so entropies and divergences are in nats (`NATS_PER_BIT`
converts: a value in nats divided by `ln 2` is the value in bits). Names say what is counted:

- **gate entropy** (`gate_entropy`): the entropy of one token's gate (selection) distribution at one layer, i.e. how
  unsure a single routing decision is. The trainers log its mean over tokens and layers as `routing/entropy`.
- **sequence routing entropy** (`selection_entropy` of `selection_counts` over one sequence): how a sequence spreads
  its tokens' top-K selections over the experts (the paper's routing entropy).
- **task-wise JSD** (`jensen_shannon`): how differently two tasks' tokens use the experts.
- **routed set differs from top-K** (`differs_from_top_k`): whether the experts that carried weight for a token are
  not its router's stock top-K set (sampled, noisy or batch-level routing).
- **expert utilization** (`expert_utilization`): the perplexity of the experts' load over `num_experts`.
"""

from __future__ import annotations

import math

import torch

NATS_PER_BIT = math.log(2)


def gate_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each gate distribution given as log-probabilities `[..., num_experts]`; returns `[...]`.

    `-inf` entries (masked experts) add nothing. Computed in the input's floating dtype (float32 for the trainers).
    """
    return -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1)


def selection_entropy(weights: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats of `weights` (counts or probabilities) normalized to sum 1 along `dim`.

    `0 * ln 0 = 0`, so unused experts add nothing; N equal weights give `ln N`, a single non-zero weight gives 0.
    All-zero weights give 0. Computed in float64.
    """
    weights = weights.double()
    p = weights / weights.sum(dim, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return -torch.special.xlogy(p, p).sum(dim)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Jensen-Shannon divergence in nats (natural log) between `p` and `q`, each normalized along `dim`.

    `JSD(p, q) = KL(p || m) / 2 + KL(q || m) / 2` with `m = (p + q) / 2`: symmetric, 0 for equal distributions and
    `ln 2` (its maximum; 1 in bits) for distributions with disjoint support. Inputs may be counts; each must have
    positive mass (`ValueError` otherwise).
    """
    p, q = p.double(), q.double()
    if (p.sum(dim) <= 0).any() or (q.sum(dim) <= 0).any():
        raise ValueError("Jensen-Shannon divergence of an empty distribution (all weights zero) is undefined.")
    p, q = p / p.sum(dim, keepdim=True), q / q.sum(dim, keepdim=True)
    m = (p + q) / 2
    kl_p = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(dim)
    kl_q = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(dim)
    return ((kl_p + kl_q) / 2).clamp(0.0, math.log(2))


def routed_expert_mask(indices: torch.Tensor, num_experts: int, active: torch.Tensor | None = None) -> torch.Tensor:
    """`[..., num_experts]` bool: the experts among `indices` (`[..., slots]`) whose slot is `active` (`None`: all).

    Negative ids (`-1`: no route) mark nothing.
    """
    keep = indices >= 0 if active is None else active & (indices >= 0)
    mask = torch.zeros(*indices.shape[:-1], num_experts + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(keep, indices.long(), num_experts), True)
    return mask[..., :num_experts]


def differs_from_top_k(
    indices: torch.Tensor, top_k: torch.Tensor, num_experts: int, active: torch.Tensor | None = None
) -> torch.Tensor:
    """`[...]` bool: the set of experts that carried weight (`indices` `[..., slots]` where `active`) is not the stock
    top-K set (`top_k` `[..., K]`). Order does not count; the widths may differ (Expert Choice)."""
    routed = routed_expert_mask(indices, num_experts, active)
    return (routed != routed_expert_mask(top_k, num_experts)).any(-1)


def expert_utilization(load: torch.Tensor) -> torch.Tensor:
    """Perplexity of the experts' load share over `num_experts`: `[..., num_experts]` loads -> `[...]` in (0, 1].

    1 when every expert got the same load, `1 / num_experts` when one expert got it all.
    """
    share = load / load.sum(-1, keepdim=True).clamp(min=1.0)
    return torch.exp(-(share * share.clamp(min=1e-12).log()).sum(-1)) / load.shape[-1]
