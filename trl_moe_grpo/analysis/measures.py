"""The routing measures, one definition each, shared by the trainers' metrics and `analyze-routing`.

Pure functions on tensors; every logarithm is natural, so entropies and divergences are in nats (`NATS_PER_BIT`
converts: a value in nats divided by `ln 2` is the value in bits). Names say what is counted:

- **gate entropy** (`gate_entropy`): the entropy of one token's gate (selection) distribution at one layer, i.e. how
  unsure a single routing decision is. The trainers log its mean over tokens and layers as `routing/entropy`.
- **sequence routing entropy** (`sequence_routing_entropy`: `entropy` of `selection_counts` over one sequence): how
  a sequence spreads its tokens' top-K selections over the experts (the paper's routing entropy); `pooled_` counts
  every token of a data set at once.
- **task-wise JSD** (`jensen_shannon`, `mean_pairwise_jsd`): how differently the tasks' tokens use the experts, in
  nats, at most `ln 2` (1 bit). The paper does not state its logarithm's base; `in_bits` converts.
- **by modality** (`modality_token_mask`): the same counts restricted to vision or to text tokens, since the two
  modalities use the experts differently (what modality guidance acts on).
- **routed set differs from top-K** (`differs_from_top_k`): whether the experts that carried weight for a token are
  not its router's stock top-K set (sampled, noisy or batch-level routing).
- **expert utilization** (`expert_utilization`): the perplexity of the experts' load over `num_experts`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from ..errors import MoEGRPOError

NATS_PER_BIT = math.log(2)
MODALITIES = ("text", "vision")  # the controller's token modality ids 0 and 1


def in_bits(nats: float | torch.Tensor | None):
    """A value in nats, in bits (`None` stays `None`)."""
    return None if nats is None else nats / NATS_PER_BIT


def gate_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each gate distribution given as log-probabilities `[..., num_experts]`; returns `[...]`.

    `-inf` entries (masked experts) add nothing. Computed in the input's floating dtype (float32 for the trainers).
    """
    return -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1)


def selection_counts(
    routes: torch.Tensor, num_experts: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """How often each expert is in the top-K, per sequence and layer.

    Args:
        routes: `[..., tokens, layers, top_k]` expert ids (e.g. `[batch, tokens, layers, top_k]`).
        num_experts: N, the number of experts per layer.
        attention_mask: `[..., tokens]`, 0 for padding; padding tokens are not counted. A token whose route is
            negative (`-1`: no route, as in routing traces) is not counted either.

    Returns:
        `[..., layers, num_experts]` int64 counts; each valid token adds `top_k` to every layer.
    """
    *lead, tokens, layers, top_k = routes.shape
    routes = routes.long().reshape(-1, tokens, layers, top_k)
    valid = torch.ones(routes.shape[:2], dtype=torch.bool, device=routes.device)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (*lead, tokens):
            raise MoEGRPOError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; routes of shape {tuple(routes.shape)} "
                f"need {(*lead, tokens)}."
            )
        valid = attention_mask.reshape(-1, tokens).bool().to(routes.device)
    valid = (valid[..., None, None] & (routes >= 0)).expand_as(routes)
    if valid.any() and int(routes[valid].max()) >= num_experts:
        raise MoEGRPOError(f"Routes hold expert id {int(routes[valid].max())}; the model has {num_experts} experts.")
    sequence = torch.arange(routes.shape[0], device=routes.device)[:, None, None, None]
    layer = torch.arange(layers, device=routes.device)[None, None, :, None]
    flat = (sequence * layers + layer) * num_experts + routes.clamp(min=0)
    counts = torch.bincount(flat[valid], minlength=routes.shape[0] * layers * num_experts)
    return counts.reshape(*lead, layers, num_experts)


def entropy(weights: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats of `weights` (counts or probabilities) normalized to sum 1 along `dim`.

    `0 * ln 0 = 0`, so unused experts add nothing; N equal weights give `ln N`, a single non-zero weight gives 0.
    All-zero weights give 0. Computed in float64.
    """
    weights = weights.double()
    p = weights / weights.sum(dim, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return -torch.special.xlogy(p, p).sum(dim)


def sequence_routing_entropy(
    routes: torch.Tensor, num_experts: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per sequence and layer: the entropy (nats) of the expert-selection frequencies over the sequence's tokens.

    `routes` is `[batch, tokens, layers, top_k]`, `attention_mask` `[batch, tokens]` (padding excluded). Returns
    `[batch, layers]`; average over sequences for the data set's value (`RoutingAnalysis.sequence_entropy`).
    """
    return entropy(selection_counts(routes, num_experts, attention_mask))


def pooled_routing_entropy(
    routes: torch.Tensor, num_experts: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per layer: the entropy (nats) of the expert-selection frequencies over all (non-padding) tokens of `routes`.

    `routes` is `[batch, tokens, layers, top_k]`; returns `[layers]`.
    """
    counts = selection_counts(routes, num_experts, attention_mask)
    return entropy(counts.reshape(-1, *counts.shape[-2:]).sum(0))


def mean_gate_entropy(gate_probs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per layer: the entropy (nats) of each token's gate distribution, averaged over the (non-padding) tokens.

    `gate_probs` is `[batch, tokens, layers, experts]` (each token's distribution sums to 1), `attention_mask`
    `[batch, tokens]`. Returns `[layers]` (zeros when there is no token).
    """
    per_token = entropy(gate_probs)  # [batch, tokens, layers]
    valid = torch.ones(per_token.shape[:2], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    valid = valid.to(per_token.device)
    return per_token[valid].sum(0) / max(int(valid.sum()), 1)


def expert_distributions_by_task(
    counts: torch.Tensor, tasks: Sequence[str], task_names: Sequence[str] | None = None
) -> tuple[list[str], torch.Tensor]:
    """Each task's distribution of top-K selections over its tokens, per layer.

    Args:
        counts: `[sequences, layers, experts]` selection counts per sequence (`selection_counts`).
        tasks: the task of each sequence.
        task_names: the tasks, in the order wanted; by default in order of first appearance in `tasks`.

    Returns:
        `(task_names, distributions)` with `distributions` `[tasks, layers, experts]` float64, each row summing to 1
        (all zeros for a task with no token).
    """
    if len(tasks) != counts.shape[0]:
        raise MoEGRPOError(f"{len(tasks)} task names for {counts.shape[0]} sequences of counts.")
    names = list(task_names) if task_names is not None else list(dict.fromkeys(tasks))
    index = {name: i for i, name in enumerate(names)}
    missing = sorted(set(tasks) - set(index))
    if missing:
        raise MoEGRPOError(f"Tasks {missing} are not in task_names {names}.")
    totals = torch.zeros(len(names), *counts.shape[1:], dtype=torch.float64)
    totals.index_add_(0, torch.tensor([index[t] for t in tasks], dtype=torch.long), counts.double().cpu())
    return names, totals / totals.sum(-1, keepdim=True).clamp(min=1.0)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Jensen-Shannon divergence in nats (natural log) between `p` and `q`, each normalized along `dim`.

    `JSD(p, q) = KL(p || m) / 2 + KL(q || m) / 2` with `m = (p + q) / 2`: symmetric, 0 for equal distributions and
    `ln 2` (its maximum) for distributions with disjoint support. Inputs may be counts; each must have positive mass.
    """
    p, q = p.double(), q.double()
    if (p.sum(dim) <= 0).any() or (q.sum(dim) <= 0).any():
        raise MoEGRPOError("Jensen-Shannon divergence of an empty distribution (all weights zero) is undefined.")
    p, q = p / p.sum(dim, keepdim=True), q / q.sum(dim, keepdim=True)
    m = (p + q) / 2
    kl_p = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(dim)
    kl_q = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(dim)
    return ((kl_p + kl_q) / 2).clamp(0.0, math.log(2))


def pairwise_jsd(distributions: torch.Tensor) -> torch.Tensor:
    """`[tasks, layers, experts]` -> `[tasks, tasks, layers]`: the JSD (nats) of every pair of tasks, per layer."""
    return jensen_shannon(distributions[:, None], distributions[None, :])


def mean_pairwise_jsd(distributions: torch.Tensor) -> torch.Tensor | None:
    """Per layer, the mean JSD (nats) over the unordered pairs of tasks: `[tasks, layers, experts]` -> `[layers]`.

    `None` when there are fewer than two tasks: a divergence between tasks does not apply.
    """
    num_tasks = distributions.shape[0]
    if num_tasks < 2:
        return None
    matrix = pairwise_jsd(distributions)
    pairs = list(itertools.combinations(range(num_tasks), 2))
    return torch.stack([matrix[i, j] for i, j in pairs]).mean(0)


def modality_token_mask(
    token_modality: torch.Tensor, modality: str, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`[..., tokens]` bool: the (non-padding) tokens of `modality` (`"text"` or `"vision"`).

    `token_modality` holds the controller's ids (`RoutingController.token_modality`: 1 for vision placeholder tokens,
    0 otherwise).
    """
    if modality not in MODALITIES:
        raise MoEGRPOError(f"Unknown modality {modality!r}: use one of {MODALITIES}.")
    mask = token_modality == MODALITIES.index(modality)
    return mask if attention_mask is None else mask & attention_mask.bool().to(mask.device)


def mean_entropy_of_nonempty(counts: torch.Tensor) -> torch.Tensor | None:
    """`[sequences, layers, experts]` counts -> `[layers]` sequence routing entropy averaged over the sequences with
    at least one counted token; `None` when no sequence has one (e.g. vision tokens of a text-only data set)."""
    present = counts.sum((-1, -2)) > 0
    if not bool(present.any()):
        return None
    return entropy(counts[present]).mean(0)


def task_jsd_of_nonempty(counts: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor | None:
    """`[layers]` mean pairwise task JSD (nats) over the tasks with at least one counted token; `None` with fewer
    than two such tasks."""
    names, distributions = expert_distributions_by_task(counts, tasks)
    present = distributions.sum((-1, -2)) > 0
    return mean_pairwise_jsd(distributions[present])


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
