"""Sampled routing: draw K distinct experts per token from the router's selection distribution.

This is the exploration half of MoE-GRPO (`docs/design.md` §2, "Sampling"). The Gumbel-top-K trick draws a set without
replacement in one vectorized step: perturb each log-probability with independent Gumbel noise and keep the K largest.
The result has exactly the law of K sequential multinomial draws without replacement, and the order of the perturbed
keys is the order in which the sequential sampler would have drawn them, which is what the trace records.
"""

from __future__ import annotations

import torch


def gumbel_top_k(log_probs: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample `k` distinct indices per row, in drawn order, without replacement.

    Args:
        log_probs (`torch.Tensor`):
            `[rows, n]` log-probabilities (unnormalized is fine). `-inf` entries are never drawn; each row needs at
            least `k` finite entries.
        k (`int`):
            How many indices to draw per row.
        generator (`torch.Generator`, *optional*):
            Source of randomness; the global generator of `log_probs`' device when `None`.

    Returns:
        `torch.Tensor`: `[rows, k]` int64 indices, first drawn first.
    """
    # `-log E` with `E ~ Exponential(1)` is Gumbel(0, 1): one draw and one log instead of a uniform's two logs (this
    # runs in every router of every decoded token). The clamp keeps `log E` finite; its bias is below float32's.
    exponential = torch.empty(log_probs.shape, device=log_probs.device, dtype=torch.float32)
    exponential.exponential_(generator=generator).clamp_min_(torch.finfo(torch.float32).tiny)
    keys = log_probs.float() - exponential.log_()
    return torch.topk(keys, k, dim=-1, sorted=True).indices


def tempered_log_probs(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log of the tempered selection distribution `q_T = softmax(log p / T)`, i.e. `p ** (1 / T)` renormalized.

    For softmax routers `log p = z + m - const`, so this is `softmax((z + m) / T)`: the law sampled routing draws from
    at `rollout_routing_temperature=T`, and the one Gate-GRPO scores sets under (`docs/design.md` §2). `-inf` entries
    (masked experts) stay `-inf`. `T = 1` returns `log_probs` itself, so the paper's path is unchanged bit for bit.
    """
    if temperature == 1.0:
        return log_probs
    return torch.log_softmax(log_probs.float() / temperature, dim=-1)


def noisy_top_k(log_probs: torch.Tensor, k: int, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Top-`k` of log-probabilities perturbed with Gaussian noise of standard deviation `std`.

    For softmax routers `log softmax(z) = z - const`, so this is the Stoch-FT-Noise baseline: noise on the router
    logits, then the stock top-K.
    """
    noise = torch.randn(log_probs.shape, device=log_probs.device, generator=generator, dtype=torch.float32)
    return torch.topk(log_probs.float() + std * noise, k, dim=-1, sorted=True).indices
