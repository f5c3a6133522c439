"""Sampled routing: Gumbel-top-K draws sets with the law that `set_log_prob` scores (`docs/design.md` §2)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from trl_moe_grpo.losses import set_log_prob
from trl_moe_grpo.routing.sampling import gumbel_top_k, noisy_top_k

DRAWS = 100_000


def _random_log_probs(n: int, seed: int, spread: float = 1.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(spread * torch.randn(n, generator=generator, dtype=torch.float32), dim=-1)


def _tolerance(prob: float, draws: int) -> float:
    """Five binomial standard deviations, plus a little room for float32 probabilities."""
    return 5 * math.sqrt(prob * (1 - prob) / draws) + 1e-4


def _set_probs(log_probs: torch.Tensor, sets: list[tuple[int, ...]], method: str) -> torch.Tensor:
    experts = torch.tensor(sets, dtype=torch.long)
    return set_log_prob(log_probs.expand(len(sets), -1), experts, method).exp()


@pytest.mark.parametrize("n", [4, 6])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gumbel_top_k_draws_sets_with_the_scored_probability(n, k):
    log_probs = _random_log_probs(n, seed=10 * n + k)
    generator = torch.Generator().manual_seed(1234 + 10 * n + k)
    drawn = gumbel_top_k(log_probs.expand(DRAWS, n), k, generator=generator)

    assert drawn.shape == (DRAWS, k)
    assert drawn.dtype == torch.int64
    # Distinct experts in every row.
    assert (drawn.sort(-1).values.diff(dim=-1) > 0).all()

    codes = (drawn.sort(-1).values * (n ** torch.arange(k - 1, -1, -1))).sum(-1)
    counts = torch.bincount(codes, minlength=n**k)
    subsets = list(itertools.combinations(range(n), k))
    probs = _set_probs(log_probs, subsets, "set")
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    for subset, prob in zip(subsets, probs.tolist()):
        code = sum(e * n ** (k - 1 - i) for i, e in enumerate(subset))
        freq = counts[code].item() / DRAWS
        assert abs(freq - prob) <= _tolerance(prob, DRAWS), (subset, freq, prob)


@pytest.mark.parametrize(("n", "k"), [(4, 2), (6, 2), (4, 3)])
def test_gumbel_top_k_order_is_the_sequential_draw_order(n, k):
    log_probs = _random_log_probs(n, seed=77 + n + k)
    generator = torch.Generator().manual_seed(4321 + n + k)
    drawn = gumbel_top_k(log_probs.expand(DRAWS, n), k, generator=generator)

    codes = (drawn * (n ** torch.arange(k - 1, -1, -1))).sum(-1)
    counts = torch.bincount(codes, minlength=n**k)
    tuples = list(itertools.permutations(range(n), k))
    probs = _set_probs(log_probs, tuples, "ordered")
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    for order, prob in zip(tuples, probs.tolist()):
        code = sum(e * n ** (k - 1 - i) for i, e in enumerate(order))
        freq = counts[code].item() / DRAWS
        assert abs(freq - prob) <= _tolerance(prob, DRAWS), (order, freq, prob)


def test_gumbel_top_k_ignores_normalization_and_is_reproducible():
    log_probs = _random_log_probs(6, seed=3).expand(1000, 6)
    first = gumbel_top_k(log_probs, 3, generator=torch.Generator().manual_seed(5))
    again = gumbel_top_k(log_probs, 3, generator=torch.Generator().manual_seed(5))
    shifted = gumbel_top_k(log_probs + 7.0, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert torch.equal(first, shifted)


def test_gumbel_top_k_never_draws_masked_experts():
    n, k = 8, 2
    log_probs = _random_log_probs(n, seed=4).clone()
    masked = torch.tensor([1, 4, 5, 7])
    log_probs[masked] = float("-inf")
    drawn = gumbel_top_k(log_probs.expand(20_000, n), k, generator=torch.Generator().manual_seed(0))
    assert not torch.isin(drawn, masked).any()
    # Every allowed expert does get drawn.
    assert set(drawn.unique().tolist()) == {0, 2, 3, 6}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gumbel_top_k_with_exactly_k_allowed_draws_them(k):
    n = 6
    allowed = torch.randperm(n, generator=torch.Generator().manual_seed(k))[:k]
    log_probs = torch.full((n,), float("-inf"))
    log_probs[allowed] = torch.log_softmax(torch.randn(k, generator=torch.Generator().manual_seed(9)), -1)
    drawn = gumbel_top_k(log_probs.expand(5000, n), k, generator=torch.Generator().manual_seed(1))
    assert (drawn.sort(-1).values == allowed.sort().values).all()


def test_noisy_top_k_without_noise_is_top_k():
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(3 * torch.randn(500, 8, generator=generator), dim=-1)
    stock = torch.topk(log_probs, 2, dim=-1).indices
    assert torch.equal(noisy_top_k(log_probs, 2, std=1e-6, generator=generator), stock)
    noisy = noisy_top_k(log_probs, 2, std=5.0, generator=generator)
    assert noisy.shape == stock.shape
    assert not torch.equal(noisy, stock)
    assert (noisy.sort(-1).values.diff(dim=-1) > 0).all()


# ---------------------------------------------------------------------------------- set probability


def _logit_cases(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    peaked = torch.linspace(-15.0, 15.0, n)[torch.randperm(n, generator=generator)]  # logits spread of 30
    return [torch.randn(n, generator=generator), 2 * torch.randn(n, generator=generator), peaked]


@pytest.mark.parametrize("n", [4, 5, 8])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_set_and_ordered_probabilities_sum_to_one(n, k):
    if k > n:
        pytest.skip("k > n")
    for logits in _logit_cases(n):
        log_probs = torch.log_softmax(logits, -1)
        subsets = list(itertools.combinations(range(n), k))
        set_probs = _set_probs(log_probs, subsets, "set")
        assert set_probs.sum().item() == pytest.approx(1.0, abs=1e-5)
        ordered_probs = _set_probs(log_probs, list(itertools.permutations(range(n), k)), "ordered")
        assert ordered_probs.sum().item() == pytest.approx(1.0, abs=1e-5)

        # A set is at least as likely as any one of its orders.
        ordered_of_sets = _set_probs(log_probs, subsets, "ordered")
        assert (set_probs.log() >= ordered_of_sets.log() - 1e-5).all()
        # The set probability is the sum of the ordered probabilities of its orders.
        by_order = dict(zip(itertools.permutations(range(n), k), ordered_probs.tolist()))
        for subset, prob in zip(subsets, set_probs.tolist()):
            assert prob == pytest.approx(sum(by_order[o] for o in itertools.permutations(subset)), rel=1e-4, abs=1e-7)


def test_set_probabilities_of_unnormalized_log_probs():
    logits = torch.randn(6, generator=torch.Generator().manual_seed(2))
    subsets = list(itertools.combinations(range(6), 3))
    from_logits = _set_probs(logits + 3.0, subsets, "set")
    from_log_probs = _set_probs(torch.log_softmax(logits, -1), subsets, "set")
    torch.testing.assert_close(from_logits, from_log_probs)


def test_set_probability_of_a_pair_has_the_closed_form():
    for n in (3, 6, 8):
        for logits in _logit_cases(n):
            probs = torch.softmax(logits.double(), -1)
            pairs = list(itertools.combinations(range(n), 2))
            ours = _set_probs(torch.log_softmax(logits, -1), pairs, "set").double()
            a, b = torch.tensor(pairs).T
            closed = probs[a] * probs[b] * (1 / (1 - probs[a]) + 1 / (1 - probs[b]))
            torch.testing.assert_close(ours, closed, rtol=1e-4, atol=1e-7)


def test_set_log_prob_is_order_invariant_and_ordered_is_not():
    log_probs = _random_log_probs(6, seed=11).expand(2, 6)
    experts = torch.tensor([[0, 3, 5], [5, 0, 3]])
    set_lp = set_log_prob(log_probs, experts, "set")
    ordered_lp = set_log_prob(log_probs, experts, "ordered")
    torch.testing.assert_close(set_lp[0], set_lp[1])
    assert not torch.allclose(ordered_lp[0], ordered_lp[1])


def test_set_log_prob_falls_back_to_ordered_past_k_4():
    n = 8
    log_probs = _random_log_probs(n, seed=5).expand(30, n)
    experts = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i))[:5] for i in range(30)])
    set_lp = set_log_prob(log_probs, experts, "set")
    assert set_lp.dtype == torch.float32
    assert torch.equal(set_lp, set_log_prob(log_probs, experts, "ordered"))


def test_set_log_prob_keeps_batch_shape():
    log_probs = torch.log_softmax(torch.randn(3, 4, 8), -1)
    experts = torch.stack([torch.randperm(8)[:2] for _ in range(12)]).view(3, 4, 2)
    assert set_log_prob(log_probs, experts).shape == (3, 4)
    assert set_log_prob(log_probs, experts.to(torch.int16)).shape == (3, 4)


def test_set_log_prob_rejects_unknown_method():
    log_probs = _random_log_probs(4, seed=0)[None]
    with pytest.raises(ValueError, match="Unknown set log-probability method"):
        set_log_prob(log_probs, torch.tensor([[0, 1]]), "unordered")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_set_log_prob_under_a_mask(k):
    n = 8
    allowed = torch.tensor([0, 2, 3, 6])
    logits = torch.randn(n, generator=torch.Generator().manual_seed(k))
    mask = torch.ones(n, dtype=torch.bool)
    mask[allowed] = False
    subsets = list(itertools.combinations(allowed.tolist(), k))
    z = logits.expand(len(subsets), n).clone().requires_grad_(True)
    log_probs = torch.log_softmax(z.masked_fill(mask, float("-inf")), -1)
    set_lp = set_log_prob(log_probs, torch.tensor(subsets), "set")
    assert torch.isfinite(set_lp).all()
    assert set_lp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    set_lp.sum().backward()
    assert torch.isfinite(z.grad).all()
    assert (z.grad[:, mask] == 0).all()

    # With exactly K experts allowed, drawing them is certain.
    only = allowed[:k]
    log_probs = torch.full((1, n), float("-inf"))
    log_probs[0, only] = torch.log_softmax(logits[only], -1)
    assert set_log_prob(log_probs, only[None], "set").item() == pytest.approx(0.0, abs=1e-6)


def _reference_set_prob(probs: torch.Tensor, experts: tuple[int, ...], ordered: bool) -> torch.Tensor:
    """The Plackett-Luce marginal, straight from the definition, in float64."""
    total = probs.new_zeros(())
    for order in [experts] if ordered else itertools.permutations(experts):
        term, drawn = probs.new_ones(()), probs.new_zeros(())
        for e in order:
            term = term * probs[e] / (1 - drawn)
            drawn = drawn + probs[e]
        total = total + term
    return total


@pytest.mark.parametrize("method", ["set", "ordered"])
@pytest.mark.parametrize("experts", [(2,), (0, 3), (4, 1, 5), (5, 0, 2, 3)])
def test_set_log_prob_value_and_gradient_match_a_float64_reference(method, experts):
    logits = torch.randn(6, generator=torch.Generator().manual_seed(len(experts)), dtype=torch.float64)

    z = logits.clone().requires_grad_(True)
    ours = set_log_prob(torch.log_softmax(z, -1), torch.tensor(experts), method)
    ours.backward()

    z_ref = logits.clone().requires_grad_(True)
    reference = _reference_set_prob(torch.softmax(z_ref, -1), experts, ordered=method == "ordered").log()
    reference.backward()

    assert ours.item() == pytest.approx(reference.item(), abs=1e-5)
    assert z.grad.abs().sum() > 0
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["set", "ordered"])
def test_set_log_prob_is_stable_for_extreme_logits(method):
    n = 8
    logits = torch.full((n,), -50.0)
    logits[0] = 50.0
    sets = [(0, 1), (1, 0), (1, 2), (0, 1, 2), (3, 0, 5, 7), (0,), (4,)]
    for experts in sets:
        z = logits.clone().requires_grad_(True)
        lp = set_log_prob(torch.log_softmax(z, -1), torch.tensor(experts), method)
        lp.backward()
        assert torch.isfinite(lp), experts
        assert torch.isfinite(z.grad).all(), experts
        assert z.grad.abs().sum() > 0, experts
    # p_0 ~ 1: the pair {0, 1} is drawn as 0 then 1 with probability p_1 / (1 - p_0) = 1 / 7.
    z = logits.clone()
    lp = set_log_prob(torch.log_softmax(z, -1), torch.tensor([0, 1]), method)
    assert lp.item() == pytest.approx(-math.log(n - 1), abs=1e-4)
    if method == "set":
        lp_reverse = set_log_prob(torch.log_softmax(z, -1), torch.tensor([1, 0]), method)
        assert lp_reverse.item() == pytest.approx(-math.log(n - 1), abs=1e-4)
        # Two unlikely experts: p_1 p_2 (1/(1-p_1) + 1/(1-p_2)) ~ 2 e^-200.
        lp_two = set_log_prob(torch.log_softmax(z, -1), torch.tensor([1, 2]), method)
        assert lp_two.item() == pytest.approx(-200 + math.log(2), abs=1e-2)
