"""Training-forward routings: Expert Choice and Sinkhorn assignment (pure tensors), and `training_routing` on models.

The assignment functions are checked against a reference written here, over random sizes (hypothesis). The controller
tests check what the experts' kernels receive: the stock output in `topk` mode, valid ids everywhere, weight exactly 0
on Expert Choice's placeholder slots, padding left out, and, under non-reentrant gradient checkpointing, a recompute
that dispatches exactly what the forward drew.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trl_moe_grpo import MoEGRPOError, RoutingController
from trl_moe_grpo.routing.assignment import expert_capacity, expert_choice, sinkhorn_log_scores, sinkhorn_top_k
from trl_moe_grpo.testing import tiny_moe_model

LAYERS, TOP_K, EXPERTS = 2, 2, 8
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------- random problems


@st.composite
def routing_problems(draw):
    """Random `(log_probs [rows, n], token_mask [rows], top_k)`, padding rows given huge scores to tempt a picker."""
    rows = draw(st.integers(1, 40))
    num_experts = draw(st.integers(2, 10))
    top_k = draw(st.integers(1, num_experts))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([0.1, 1.0, 4.0]))
    generator = torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(spread * torch.randn(rows, num_experts, generator=generator), dim=-1)
    token_mask = torch.rand(rows, generator=generator) < draw(st.sampled_from([1.0, 0.8, 0.4]))
    # If padding took capacity or mass anywhere, these rows would win it.
    log_probs[~token_mask] = 50.0 + torch.rand(int((~token_mask).sum()), num_experts, generator=generator)
    return log_probs, token_mask, top_k


def reference_choices(log_probs: torch.Tensor, token_mask: torch.Tensor, capacity: int) -> torch.Tensor:
    """`[rows, n]` bool: expert e chose token t, by a per-expert loop over the non-padding rows."""
    chosen = torch.zeros_like(log_probs, dtype=torch.bool)
    valid_rows = token_mask.nonzero().flatten()
    for expert in range(log_probs.shape[1]):
        order = log_probs[valid_rows, expert].argsort(descending=True)
        chosen[valid_rows[order[:capacity]], expert] = True
    return chosen


def distinct_in_range(indices: torch.Tensor, num_experts: int) -> bool:
    ordered = indices.sort(-1).values
    return bool((indices >= 0).all() and (indices < num_experts).all() and (ordered.diff(dim=-1) > 0).all())


# ---------------------------------------------------------------------- Expert Choice


@PROPERTY_SETTINGS
@given(routing_problems(), st.sampled_from([0.25, 0.5, 1.0, 1.3, 2.0, 4.0]))
def test_expert_choice_matches_a_per_expert_reference(problem, capacity_factor):
    """Each expert takes its top-C non-padding tokens, so its load is exactly C; a token keeps every expert that took
    it (0..N of them), best first, in a layout as wide as the token with the most."""
    log_probs, token_mask, top_k = problem
    rows, num_experts = log_probs.shape
    result = expert_choice(log_probs, top_k, capacity_factor, token_mask)
    tokens = int(token_mask.sum())

    exact_factor = Fraction(capacity_factor).limit_denominator(100)
    assert result.capacity == min(tokens, math.ceil(exact_factor * tokens * top_k / num_experts))
    chosen = reference_choices(log_probs, token_mask, result.capacity)
    width = max(1, int(chosen.sum(-1).max()))
    assert result.indices.shape == (rows, width) and result.indices.dtype == torch.int64
    assert distinct_in_range(result.indices, num_experts)

    assert torch.equal(result.num_choices, chosen.sum(-1))
    # Every expert's load is exactly its capacity (no expert has fewer than C non-padding tokens to pick from).
    assert torch.equal(chosen.sum(0), torch.full((num_experts,), result.capacity))
    # Active slots form a prefix as long as the token's number of choices; padding rows have none.
    prefix = torch.arange(width) < result.num_choices[:, None]
    assert torch.equal(result.active, prefix)
    assert not bool(result.active[~token_mask].any()) and not bool(result.num_choices[~token_mask].any())
    load = torch.zeros(num_experts, dtype=torch.long).scatter_add_(
        0, result.indices[result.active], torch.ones(int(result.active.sum()), dtype=torch.long)
    )
    assert torch.equal(load, chosen.sum(0))
    for row in token_mask.nonzero().flatten().tolist():
        active = result.indices[row][result.active[row]]
        assert set(active.tolist()) == set(chosen[row].nonzero().flatten().tolist())
        assert bool((log_probs[row, active].diff() <= 0).all()), "choices are not best first"


def test_expert_choice_gives_tokens_zero_to_many_experts():
    """One token every expert prefers takes all of them; the others share what is left, some get none."""
    log_probs = torch.log_softmax(torch.randn(12, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    log_probs[3] = 0.0  # the best token of every expert
    result = expert_choice(log_probs, top_k=1, capacity_factor=1.0)  # C = 3
    assert result.capacity == 3 and result.indices.shape == (12, 4)
    assert int(result.num_choices[3]) == 4 and bool(result.active[3].all())
    assert int(result.num_choices.min()) == 0 and int(result.num_choices.sum()) == 12


@pytest.mark.parametrize(
    ("tokens", "top_k", "experts", "factor", "expected"),
    [
        (10, 2, 8, 1.0, 3),
        (8, 2, 8, 1.0, 2),
        (24, 2, 8, 1.0, 6),
        (8, 2, 8, 0.5, 1),
        (5, 2, 4, 10.0, 5),
        (0, 2, 8, 1, 0),
    ],
)
def test_expert_capacity(tokens, top_k, experts, factor, expected):
    """ceil(factor * tokens * K / N), no extra slot from float noise, capped at the number of tokens."""
    assert expert_capacity(tokens, top_k, experts, factor) == expected


# ---------------------------------------------------------------------- Sinkhorn


@PROPERTY_SETTINGS
@given(routing_problems(), st.integers(1, 5))
def test_sinkhorn_balances_marginals_and_ignores_padding(problem, iterations):
    """Equal expert marginals over the non-padding rows; padding neither counts nor changes; ids distinct, in range."""
    log_probs, token_mask, top_k = problem
    num_experts = log_probs.shape[1]
    balanced = sinkhorn_log_scores(log_probs, iterations, token_mask)
    assert torch.equal(balanced[~token_mask], log_probs[~token_mask])
    if token_mask.any():
        marginals = balanced[token_mask].exp().sum(0)
        torch.testing.assert_close(marginals, torch.full_like(marginals, 1 / num_experts), rtol=1e-4, atol=1e-6)
    # Per-token constants (logits vs. their log-softmax) do not change the balanced scores.
    shifted = log_probs + 7.0 * torch.randn(log_probs.shape[0], 1)
    torch.testing.assert_close(
        sinkhorn_log_scores(shifted, iterations, token_mask)[token_mask], balanced[token_mask], rtol=0, atol=1e-4
    )
    # Padding rows do not move the valid rows' result.
    unpadded = sinkhorn_log_scores(log_probs[token_mask], iterations)
    torch.testing.assert_close(balanced[token_mask], unpadded, rtol=0, atol=1e-5)

    indices = sinkhorn_top_k(log_probs, top_k, iterations, token_mask)
    assert indices.shape == (log_probs.shape[0], top_k) and distinct_in_range(indices, num_experts)
    assert torch.equal(sinkhorn_top_k(log_probs, top_k, 0, token_mask), log_probs.topk(top_k, dim=-1).indices)


def test_sinkhorn_balances_skewed_routing_much_better_than_top_k():
    """Logits biased towards two experts: top-K sends most slots there, Sinkhorn-balanced top-K spreads them evenly."""
    generator = torch.Generator().manual_seed(0)
    bias = torch.tensor([3.0, 2.5, 0.0, 0.0, -0.5, -0.5, -1.0, -1.0])
    logits = torch.randn(512, EXPERTS, generator=generator) + bias

    def load_spread(indices: torch.Tensor) -> float:
        load = torch.bincount(indices.flatten(), minlength=EXPERTS).float()
        return float(load.std() / load.mean())

    top_k = load_spread(logits.topk(TOP_K, dim=-1).indices)
    balanced = load_spread(sinkhorn_top_k(logits, TOP_K, iterations=3))
    assert top_k > 1.0, "the logits must be skewed for the comparison to mean something"
    assert balanced < 0.15 * top_k, (balanced, top_k)


# ---------------------------------------------------------------------- training routing on a model


def build(family: str = "qwen3_moe", seed: int = 0):
    model = tiny_moe_model(family, seed=seed)
    return model, RoutingController(model)


def batch(rows: int = 3, length: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a right-padded attention mask (row 0 has 3 padding tokens, row 1 has 1)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 40, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0
    attention_mask[1, -1:] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


def routers(model, controller) -> list[torch.nn.Module]:
    modules = dict(model.named_modules())
    return [modules[name] for name in controller.layer_names]


def watch_router_outputs(model, controller) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per layer, `(weights, indices)` of every router call as the experts receive them (after the controller)."""
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in controller.layer_names]
    for layer, router in enumerate(routers(model, controller)):
        router.register_forward_hook(lambda m, a, out, layer=layer: seen[layer].append((out[1].detach(), out[2])))
    return seen


MODES = ["topk", "sample", "noise", "expert_choice", "sinkhorn"]


def test_topk_training_routing_is_the_stock_model():
    """`training_routing("topk")`: logits and gradients bit-identical to the same model without a controller."""
    model, controller = build()
    stock = tiny_moe_model(seed=0).train()
    model.train()
    input_ids, attention_mask = batch()
    with controller.training_routing("topk") as routes:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits.sum().backward()
        captures = routes.captures()
    expected = stock(input_ids=input_ids, attention_mask=attention_mask).logits
    expected.sum().backward()

    assert torch.equal(logits, expected)
    for (name, p), q in zip(model.named_parameters(), stock.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for capture in captures:
        assert torch.equal(capture.dispatched, capture.top_k) and capture.logits.requires_grad
        assert torch.equal(capture.valid, attention_mask.reshape(-1).bool())


@pytest.mark.parametrize("mode", ["sample", "noise", "sinkhorn"])
def test_token_choice_modes_dispatch_valid_sets_that_differ_from_top_k(mode):
    """Sampled, noisy and Sinkhorn routes: K distinct ids in range, often not the live top-K; padding keeps top-K."""
    model, controller = build()
    input_ids, attention_mask = batch(rows=4, length=10)
    seen = watch_router_outputs(model, controller)
    # Noise of std 1 on the logits (the default is V-MoE's 1 / num_experts), so the noisy routes differ often.
    with controller.training_routing(mode, noise_std=1.0) as routes, torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    valid = attention_mask.reshape(-1).bool()
    for layer, capture in enumerate(routes.captures()):
        ((weights, indices),) = seen[layer]
        assert torch.equal(indices, capture.dispatched)
        assert distinct_in_range(indices, EXPERTS)
        assert bool((indices != capture.top_k).any(-1)[valid].float().mean() > 0.2)
        assert torch.equal(indices[~valid], capture.top_k[~valid])
        assert bool(capture.active.all()) and bool((capture.num_choices == TOP_K).all())
        adapter = controller.adapters[layer]
        # V-MoE's noisy softmax: the mixing weights come from the noisy logits that chose the experts.
        assert (capture.logit_noise is not None) == (mode == "noise")
        logits = capture.logits if capture.logit_noise is None else capture.logits + capture.logit_noise
        if mode == "noise":
            assert torch.equal(indices[valid], adapter.selection_log_probs(logits).topk(TOP_K).indices[valid])
        expected = adapter.mixing_weights(logits, indices, like=weights)
        torch.testing.assert_close(weights[valid], expected[valid])


@pytest.mark.parametrize("noisy_mixing_weights", [True, False])
def test_noise_routing_follows_v_moe(noisy_mixing_weights):
    """Default std 1 / num_experts on the logits; the weights are the noisy softmax's unless asked otherwise."""
    model, controller = build()
    input_ids, attention_mask = batch(rows=4, length=10)
    seen = watch_router_outputs(model, controller)
    with torch.no_grad(), controller.training_routing("noise", noisy_mixing_weights=noisy_mixing_weights) as routes:
        model(input_ids=input_ids, attention_mask=attention_mask)
    valid = attention_mask.reshape(-1).bool()
    for layer, capture in enumerate(routes.captures()):
        ((weights, indices),) = seen[layer]
        noise_free = controller.adapters[layer].mixing_weights(capture.logits, indices, like=weights)
        if noisy_mixing_weights:
            noise = capture.logit_noise[valid]
            assert abs(float(noise.std()) - 1 / EXPERTS) < 0.3 / EXPERTS  # V-MoE's std, 1/8 here
            assert not torch.allclose(weights[valid], noise_free[valid])
        else:
            assert capture.logit_noise is None
            torch.testing.assert_close(weights[valid], noise_free[valid])


@pytest.mark.parametrize("factor", [0.75, 2.0])
def test_expert_choice_through_the_controller(factor):
    """Loads equal the capacity; a token takes 0..N experts, each weighted by the token's gate probability (Zhou et
    al.); placeholder slots and padding weigh exactly 0. The kernels get as many slots as the busiest token."""
    model, controller = build()
    input_ids, attention_mask = batch(rows=4, length=10)
    seen = watch_router_outputs(model, controller)
    with controller.training_routing("expert_choice", capacity_factor=factor) as routes, torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    valid = attention_mask.reshape(-1).bool()
    capacity = expert_capacity(int(valid.sum()), TOP_K, EXPERTS, factor)
    dropped = crowded = 0
    for layer, capture in enumerate(routes.captures()):
        ((weights, indices),) = seen[layer]
        assert torch.equal(indices, capture.dispatched) and weights.shape == indices.shape
        assert indices.shape[1] == int(capture.num_choices.max())
        assert distinct_in_range(indices, EXPERTS)
        assert not bool(capture.num_choices[~valid].any()), "a padding token was chosen"
        assert not bool(capture.active[~valid].any()) and bool((weights[~valid] == 0).all())
        load = torch.bincount(indices[capture.active], minlength=EXPERTS)
        assert torch.equal(load, torch.full((EXPERTS,), capacity))
        assert torch.equal(capture.active.sum(-1), capture.num_choices)
        inactive = ~capture.active
        assert bool(inactive.any()), "no placeholder slot: the test would not check anything"
        assert bool((weights[inactive] == 0).all())
        gate_probs = controller.adapters[layer].selection_log_probs(capture.logits).exp().gather(-1, indices)
        torch.testing.assert_close(weights[capture.active], gate_probs[capture.active])
        dropped += int((valid & (capture.num_choices == 0)).sum())
        crowded += int((capture.num_choices > TOP_K).sum())
    if factor < 1:
        assert dropped > 0, "with capacity factor 0.75 some token should be taken by no expert"
    else:
        assert crowded > 0, "with capacity factor 2 some token should be taken by more than top_k experts"


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_expert_choice_mixture_is_what_the_experts_compute(family):
    """The kernels read the widened layout: each token's MoE output is the sum, over the experts that chose it, of its
    gate probability times that expert's own output (computed here one expert and one token at a time)."""
    model, controller = build(family)
    input_ids, attention_mask = batch(rows=2, length=6)
    experts = next(m for name, m in model.named_modules() if name.endswith("mlp.experts"))
    seen = []
    experts.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    with controller.training_routing("expert_choice", capacity_factor=2.0) as routes, torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    capture = routes.captures()[0]
    assert capture.dispatched.shape[1] > TOP_K
    (hidden, mixed), probs = seen[0], controller.adapters[0].selection_log_probs(capture.logits).exp()
    with torch.no_grad():
        for row in range(hidden.shape[0]):
            expected = torch.zeros_like(mixed[row])
            for slot in capture.active[row].nonzero().flatten().tolist():
                expert = capture.dispatched[row, slot]
                one = torch.tensor([[int(expert)]])
                alone = experts(hidden[row : row + 1], one, torch.ones(1, 1, dtype=hidden.dtype))[0]
                expected += probs[row, expert] * alone
            torch.testing.assert_close(mixed[row], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_routers_gradients(mode):
    model, controller = build(seed=1)
    model.train()
    input_ids, attention_mask = batch()
    with controller.training_routing(mode, capacity_factor=2.0):
        model(input_ids=input_ids, attention_mask=attention_mask).logits.pow(2).mean().backward()
    for router in routers(model, controller):
        assert router.weight.grad is not None and bool(router.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("mode", ["sample", "expert_choice", "noise", "sinkhorn"])
def test_checkpoint_recompute_dispatches_the_drawn_routes(mode):
    """Non-reentrant checkpointing re-runs the routers in backward: same routes, same gradients as without it.

    The RNG is not restored for the recompute (`preserve_rng_state=False`), so a fresh draw in `sample` / `noise`
    would differ there. For the deterministic batch-level modes it guards that the batch's padding mask and routes
    reach the recompute, which the model's pre-hook does not see.
    """
    input_ids, attention_mask = batch(rows=4, length=10)

    def run(checkpointing: bool):
        model, controller = build(seed=2)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False, "preserve_rng_state": False})
        seen = watch_router_outputs(model, controller)
        torch.manual_seed(5)
        with controller.training_routing(mode, capacity_factor=0.75) as routes:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            logits.pow(2).mean().backward()
            captures = routes.captures()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        return seen, captures, grads

    plain_seen, _, plain_grads = run(checkpointing=False)
    seen, captures, grads = run(checkpointing=True)
    for layer in range(LAYERS):
        assert len(plain_seen[layer]) == 1 and len(seen[layer]) == 2, "the routers did not run again in backward"
        (weights, indices), (recomputed_weights, recomputed_indices) = seen[layer]
        assert torch.equal(recomputed_indices, indices) and torch.equal(recomputed_weights, weights)
        assert torch.equal(indices, plain_seen[layer][0][1])
        assert torch.equal(captures[layer].dispatched, indices)  # captured once, by the forward
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_repeated_forward_on_the_same_batch_reuses_the_routes():
    """Two forwards on the same ids in one context route alike (sampled), unlike two contexts."""
    model, controller = build()
    input_ids, attention_mask = batch()
    with controller.training_routing("sample") as routes, torch.no_grad():
        first = model(input_ids=input_ids, attention_mask=attention_mask).logits
        again = model(input_ids=input_ids, attention_mask=attention_mask).logits
    with controller.training_routing("sample") as other, torch.no_grad():
        fresh = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(first, again)
    assert not torch.equal(first, fresh)
    assert not torch.equal(routes.captures()[0].dispatched, other.captures()[0].dispatched)


def test_training_routing_misuse_is_refused_and_state_cleared():
    model, controller = build()
    input_ids, attention_mask = batch()
    with torch.no_grad():
        stock = model(input_ids=input_ids, attention_mask=attention_mask).logits

    with pytest.raises(MoEGRPOError, match="Unknown training routing"):
        with controller.training_routing("replay"):
            pass
    with pytest.raises(MoEGRPOError, match="capacity_factor"):
        with controller.training_routing("expert_choice", capacity_factor=0.0):
            pass
    with pytest.raises(MoEGRPOError, match="No forward ran"):
        with controller.training_routing("sample") as routes:
            routes.captures()
    with controller.training_routing("sample"), torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
        with pytest.raises(MoEGRPOError, match="different batch"):
            model(input_ids=input_ids.flip(0), attention_mask=attention_mask)
        with pytest.raises(MoEGRPOError, match="one routing at a time"):
            with controller.rollout("sample"):
                pass
        with pytest.raises(MoEGRPOError, match="one routing at a time"):
            with controller.training_routing("topk"):
                pass
    with controller.training_routing("expert_choice"), torch.no_grad():
        with pytest.raises(MoEGRPOError, match="attention mask"):
            model(input_ids=input_ids, attention_mask=attention_mask[:, None, None, :])
    with pytest.raises(RuntimeError, match="boom"):
        with controller.training_routing("sinkhorn"), torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
            raise RuntimeError("boom")

    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, stock)
    assert controller.mode == "topk"
