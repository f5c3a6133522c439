"""Routing controller: sampled rollouts, trace recording, replay (with gradients and checkpoint recompute), errors."""

from __future__ import annotations

import pytest
import torch

from trl_moe_grpo import MoEGRPOError, RoutingController
from trl_moe_grpo.testing import tiny_moe_model

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3"]
LAYERS, TOP_K, EXPERTS = 2, 2, 8


# ---------------------------------------------------------------------- helpers


def build(family: str = "qwen3_moe", seed: int = 0, **kwargs):
    """A tiny MoE model and its controller."""
    model = tiny_moe_model(family, seed=seed)
    return model, RoutingController(model, **kwargs)


def random_ids(batch: int = 3, length: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, 40, (batch, length), generator=generator)


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def sample_trace(model, controller, input_ids: torch.Tensor, seed: int = 0):
    """Run one sampled forward: `(trace, logits)`."""
    torch.manual_seed(seed)
    with controller.rollout("sample") as recording:
        logits = logits_of(model, input_ids)
    (trace,) = recording.steps
    return trace, logits


def replay(model, controller, input_ids: torch.Tensor, trace: torch.Tensor, **kwargs):
    """Replay `trace` on `input_ids` in one call (no grad): `(logits, captures)`."""
    with controller.step_scope():
        controller.start_replay(trace, **kwargs)
        logits = logits_of(model, input_ids)
        controller.finish_replay()
        return logits, controller.captures()


def replay_backward(model, controller, input_ids: torch.Tensor, trace: torch.Tensor, chunks: int = 1):
    """Replay `trace` in training, backward the summed logits inside the step: `(logits, captures, router grads)`."""
    model.zero_grad(set_to_none=True)
    with controller.step_scope():
        controller.start_replay(trace)
        logits = torch.cat([model(part).logits for part in input_ids.chunk(chunks)])
        controller.finish_replay()
        logits.sum().backward()
        captures = controller.captures()
    grads = [router.weight.grad for router in routers(model, controller)]
    return logits.detach(), captures, grads


def routers(model, controller) -> list[torch.nn.Module]:
    modules = dict(model.named_modules())
    return [modules[name] for name in controller.layer_names]


def rows(trace: torch.Tensor, layer: int) -> torch.Tensor:
    """A trace's ids for one layer, as the `[batch * tokens, top_k]` int64 rows captures use."""
    return trace[:, :, layer].reshape(-1, TOP_K).long()


def same_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, whether two `[rows, top_k]` id tensors hold the same set of experts."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)


def count_router_calls(model, controller) -> list[int]:
    """A live counter of router forward calls (the hook stays until the model is dropped)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for router in routers(model, controller):
        router.register_forward_hook(hook)
    return calls


def vision_text_masks(text: list[int], vision: list[int]) -> torch.Tensor:
    """`[layers, 2, experts]` masks allowing `text` experts for text tokens and `vision` experts for vision tokens."""
    masks = torch.zeros(LAYERS, 2, EXPERTS, dtype=torch.bool)
    masks[:, 0, text] = True
    masks[:, 1, vision] = True
    return masks


# ---------------------------------------------------------------------- recording and sampling


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_rollout_records_stock_routes_without_changing_logits(family):
    """Recording under `rollout("topk")` leaves logits bit-identical and records the router's own top-K."""
    model, controller = build(family)
    input_ids = random_ids()
    stock = logits_of(model, input_ids)
    with controller.rollout("topk") as recording:
        assert torch.equal(logits_of(model, input_ids), stock)
    assert controller.mode == "topk"
    (trace,) = recording.steps
    _, captures = replay(model, controller, input_ids, trace.new_full(trace.shape, -1))
    for layer, capture in enumerate(captures):
        assert torch.equal(capture.top_k, rows(trace, layer))
        assert not bool(capture.valid.any())


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_records_routes_and_selection_probabilities_without_changing_the_model(family):
    """`capture()` only records: logits bit-identical to the stock model's, the router's own top-K, and each token's
    selection distribution (the adapter's)."""
    model, controller = build(family)
    input_ids = random_ids(batch=2, length=5, seed=1)
    stock = logits_of(model, input_ids)
    with controller.capture() as recording:
        assert torch.equal(logits_of(model, input_ids), stock)
    assert controller.mode == "topk"
    (routes,), (probs,) = recording.steps, recording.selection_probs
    assert routes.shape == (2, 5, LAYERS, TOP_K) and probs.shape == (2, 5, LAYERS, EXPERTS)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5, LAYERS))
    _, captures = replay(model, controller, input_ids, routes.new_full(routes.shape, -1))
    for layer, (adapter, capture) in enumerate(zip(controller.adapters, captures)):
        assert torch.equal(capture.top_k, rows(routes, layer))
        expected = adapter.selection_log_probs(capture.logits).exp()
        torch.testing.assert_close(probs[:, :, layer].reshape(-1, EXPERTS), expected)
    with controller.capture(selection_probs=False) as recording:
        logits_of(model, input_ids)
    assert recording.selection_probs is None and torch.equal(recording.steps[0], routes)


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_mode_draws_distinct_valid_experts(family):
    """Sampled routing changes the outputs and records `[B, S, L, K]` int16 ids, distinct per token, in range."""
    model, controller = build(family)
    input_ids = random_ids(batch=4, length=8)
    stock = logits_of(model, input_ids)
    trace, sampled = sample_trace(model, controller, input_ids)

    assert trace.shape == (4, 8, LAYERS, TOP_K) and trace.dtype == torch.int16
    assert int(trace.min()) >= 0 and int(trace.max()) < EXPERTS
    assert bool((trace[..., 0] != trace[..., 1]).all()), "a token drew the same expert twice"
    assert (sampled - stock).abs().max() > 1e-4, "sampled routing left the outputs unchanged"
    _, captures = replay(model, controller, input_ids, trace)
    assert not bool(same_sets(captures[0].dispatched, captures[0].top_k).all()), "samples all equal the top-K"


def test_sample_mode_is_seeded_by_the_global_generator():
    """Two sampled forwards under the same `torch.manual_seed` draw the same routes; another seed draws others."""
    model, controller = build()
    input_ids = random_ids(batch=4, length=8)
    first, _ = sample_trace(model, controller, input_ids, seed=3)
    again, _ = sample_trace(model, controller, input_ids, seed=3)
    other, _ = sample_trace(model, controller, input_ids, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_noise_mode_without_noise_is_topk():
    """`rollout("noise", noise_std=0)` routes like the stock top-K; with noise it routes differently."""
    model, controller = build()
    input_ids = random_ids(batch=4, length=8)
    stock = logits_of(model, input_ids)
    with controller.rollout("topk") as topk_recording:
        logits_of(model, input_ids)
    with controller.rollout("noise", noise_std=0.0) as recording:
        quiet = logits_of(model, input_ids)
    torch.testing.assert_close(quiet, stock, rtol=0, atol=1e-6)
    assert torch.equal(recording.steps[0], topk_recording.steps[0])

    torch.manual_seed(0)
    with controller.rollout("noise", noise_std=5.0) as recording:
        logits_of(model, input_ids)
    assert not torch.equal(recording.steps[0], topk_recording.steps[0])


# ---------------------------------------------------------------------- replay


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_reproduces_sampled_logits(family):
    """Replaying a sampled trace gives the sampled logits and dispatches the recorded ids, not the live top-K."""
    model, controller = build(family)
    input_ids = random_ids(batch=4, length=8)
    trace, sampled = sample_trace(model, controller, input_ids)
    replayed, captures = replay(model, controller, input_ids, trace)

    assert (replayed - sampled).abs().max() <= 1e-6
    assert len(captures) == LAYERS
    for layer, capture in enumerate(captures):
        assert capture.logits.shape == (4 * 8, EXPERTS)
        assert torch.equal(capture.dispatched, rows(trace, layer))
        assert torch.equal(capture.recorded, rows(trace, layer))
        assert bool(capture.valid.all())
    assert any(bool((c.dispatched != c.top_k).any()) for c in captures), "replayed ids all equal the live top-K"


def test_replay_mixing_weights_come_from_live_logits():
    """After the router weights move, the same trace dispatches the same ids but gives different outputs."""
    model, controller = build()
    input_ids = random_ids(batch=4, length=8)
    trace, _ = sample_trace(model, controller, input_ids)
    before, captures_before = replay(model, controller, input_ids, trace)

    torch.manual_seed(1)
    with torch.no_grad():
        for router in routers(model, controller):
            router.weight.add_(torch.randn_like(router.weight) * 0.5)
    after, captures_after = replay(model, controller, input_ids, trace)

    assert (after - before).abs().max() > 1e-4
    for layer in range(LAYERS):
        assert torch.equal(captures_after[layer].dispatched, rows(trace, layer))
        assert torch.equal(captures_after[layer].dispatched, captures_before[layer].dispatched)
        assert not torch.allclose(captures_after[layer].logits, captures_before[layer].logits)


def test_replay_without_dispatch_routes_live_but_captures_the_trace():
    """`start_replay(dispatch=False)` computes the stock outputs but still captures the recorded sets."""
    model, controller = build()
    input_ids = random_ids(batch=4, length=8)
    stock = logits_of(model, input_ids)
    trace, _ = sample_trace(model, controller, input_ids)
    logits, captures = replay(model, controller, input_ids, trace, dispatch=False)
    assert torch.equal(logits, stock)
    for layer, capture in enumerate(captures):
        assert torch.equal(capture.recorded, rows(trace, layer))
        assert torch.equal(capture.dispatched, capture.top_k)


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_gradient_reaches_every_router(family):
    """In training, replaying a sampled trace and backpropagating gives every router weight a non-zero gradient."""
    model, controller = build(family)
    input_ids = random_ids(batch=2, length=6)
    trace, _ = sample_trace(model, controller, input_ids)
    model.train()
    _, captures, grads = replay_backward(model, controller, input_ids, trace)
    for layer, grad in enumerate(grads):
        assert grad is not None and bool(grad.abs().sum() > 0), controller.layer_names[layer]
        assert captures[layer].logits.requires_grad


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_replay_under_gradient_checkpointing_matches_plain_replay(family):
    """Non-reentrant checkpoint recompute replays the same routes: same logits and grads, captures not duplicated."""
    model, controller = build(family)
    input_ids = random_ids(batch=2, length=6)
    trace, _ = sample_trace(model, controller, input_ids)
    model.train()
    plain_logits, _, plain_grads = replay_backward(model, controller, input_ids, trace)

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = count_router_calls(model, controller)
    logits, captures, grads = replay_backward(model, controller, input_ids, trace)

    assert calls[0] == 2 * LAYERS, "the routers did not run again during backward: checkpointing was off"
    assert torch.equal(logits, plain_logits)
    for layer in range(LAYERS):
        assert captures[layer].logits.shape[0] == 2 * 6
        assert torch.equal(captures[layer].dispatched, rows(trace, layer))
        assert bool(grads[layer].abs().sum() > 0)
        torch.testing.assert_close(grads[layer], plain_grads[layer], rtol=1e-5, atol=1e-7)


def test_checkpoint_recompute_keeps_nothing_of_its_own():
    """The recompute in backward replays the routes but leaves the forward's captures in place: a recompute capture
    would keep the recomputed layer's activations alive until the step ends."""
    model, controller = build()
    input_ids = random_ids(batch=2, length=6)
    trace, _ = sample_trace(model, controller, input_ids)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = count_router_calls(model, controller)
    with controller.step_scope():
        controller.start_replay(trace)
        logits = model(input_ids).logits
        controller.finish_replay()
        forward = [capture.logits for capture in controller._captures.values()]
        logits.sum().backward()
        after = [capture.logits for capture in controller._captures.values()]
    assert calls[0] == 2 * LAYERS, "the routers did not run again during backward: checkpointing was off"
    assert len(after) == LAYERS and all(a is f for a, f in zip(after, forward))


def test_chunked_replay_with_gradients_is_refused():
    """Under grad, a second replayed call in one trace is an error: checkpoint recompute could not tell calls apart."""
    model, controller = build()
    input_ids = random_ids(batch=4, length=6)
    trace, _ = sample_trace(model, controller, input_ids)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(MoEGRPOError, match="only without gradients"):
        replay_backward(model, controller, input_ids, trace, chunks=2)
    _, captures, grads = replay_backward(model, controller, input_ids, trace)  # one call is fine
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_layers_keep_their_order():
    """`layer_names` follow module order and trace layer `l` is dispatched to MoE layer `l`."""
    model, controller = build()
    module_order = [name for name, _ in model.named_modules() if name in set(controller.layer_names)]
    assert controller.layer_names == module_order
    assert [name.split(".")[2] for name in controller.layer_names] == ["0", "1"]

    input_ids = random_ids(batch=2, length=6)
    trace, _ = sample_trace(model, controller, input_ids)
    trace[:, :, 1] = (trace[:, :, 0] + 3) % EXPERTS  # layer 1 routes differ from layer 0 at every token
    logits, captures = replay(model, controller, input_ids, trace)
    for layer in range(LAYERS):
        assert torch.equal(captures[layer].dispatched, rows(trace, layer))

    swapped, _ = replay(model, controller, input_ids, trace.flip(2))
    assert (swapped - logits).abs().max() > 1e-4


def test_minus_one_rows_take_live_routing():
    """Tokens marked `-1` go to the live top-K, are not valid, and match a trace filled with those top-K ids."""
    model, controller = build()
    input_ids = random_ids(batch=3, length=6)
    trace, _ = sample_trace(model, controller, input_ids)
    missing = torch.zeros(3, 6, dtype=torch.bool)
    missing[0, :2] = missing[1, 3] = missing[2, 5] = True
    partial = trace.clone()
    partial[missing] = -1

    logits, captures = replay(model, controller, input_ids, partial)
    flat = missing.reshape(-1)
    filled = partial.clone()
    for layer, capture in enumerate(captures):
        assert torch.equal(capture.valid, ~flat)
        assert torch.equal(capture.dispatched[flat], capture.top_k[flat])
        assert torch.equal(capture.recorded[flat], capture.top_k[flat])
        assert torch.equal(capture.dispatched[~flat], rows(trace, layer)[~flat])
        filled[:, :, layer] = capture.dispatched.view(3, 6, TOP_K).to(torch.int16)

    filled_logits, filled_captures = replay(model, controller, input_ids, filled)
    assert all(bool(c.valid.all()) for c in filled_captures)
    assert torch.equal(filled_logits, logits)


def test_chunked_replay_matches_one_call():
    """A 4-row trace replayed by two 2-row calls equals one 4-row call; captures hold all rows in order."""
    model, controller = build()
    input_ids = random_ids(batch=4, length=6)
    trace, _ = sample_trace(model, controller, input_ids)
    one_call, one_call_captures = replay(model, controller, input_ids, trace)

    with controller.step_scope():
        controller.start_replay(trace)
        chunked = torch.cat([logits_of(model, input_ids[:2]), logits_of(model, input_ids[2:])])
        controller.finish_replay()
        captures = controller.captures()

    torch.testing.assert_close(chunked, one_call, rtol=0, atol=1e-6)
    for layer in range(LAYERS):
        assert captures[layer].logits.shape == (4 * 6, EXPERTS)
        assert torch.equal(captures[layer].dispatched, rows(trace, layer))
        torch.testing.assert_close(captures[layer].logits, one_call_captures[layer].logits, rtol=0, atol=1e-6)


def test_controllers_keep_per_model_state():
    """Replay on one model's controller leaves another model (with its own controller) on stock routing."""
    model_a, controller_a = build(seed=0)
    model_b, controller_b = build(seed=1)
    input_ids = random_ids(batch=2, length=6)
    stock_b = logits_of(model_b, input_ids)
    trace, sampled_a = sample_trace(model_a, controller_a, input_ids)

    with controller_a.step_scope():
        controller_a.start_replay(trace)
        assert torch.equal(logits_of(model_b, input_ids), stock_b)
        replayed_a = logits_of(model_a, input_ids)
        assert torch.equal(logits_of(model_b, input_ids), stock_b)
        controller_a.finish_replay()
        assert controller_b.mode == "topk"
        with pytest.raises(MoEGRPOError):
            controller_b.captures()
    assert (replayed_a - sampled_a).abs().max() <= 1e-6


# ---------------------------------------------------------------------- expert masks


def test_expert_masks_restrict_sampling():
    """With text tokens masked to experts {0, 1, 2}, no sampled route leaves them; without masks, routes do."""
    model, controller = build()
    input_ids = random_ids(batch=8, length=16)
    controller.set_expert_masks(vision_text_masks(text=[0, 1, 2], vision=list(range(EXPERTS))))
    seen = set()
    for seed in range(5):
        trace, _ = sample_trace(model, controller, input_ids, seed=seed)
        seen |= set(trace.unique().tolist())
    assert seen == {0, 1, 2}

    controller.set_expert_masks(None)
    trace, _ = sample_trace(model, controller, input_ids)
    assert set(trace.unique().tolist()) - {0, 1, 2}


def test_vision_tokens_sample_from_the_vision_mask():
    """Vision placeholder tokens draw only vision-allowed experts, text tokens only text-allowed ones."""
    model, controller = build(vision_token_ids=[5])
    input_ids = random_ids(batch=4, length=10)
    input_ids[input_ids == 5] = 6
    input_ids[:, 2:5] = 5
    input_ids[1, 8] = 5
    is_vision = input_ids == 5
    assert torch.equal(controller.token_modality(input_ids), is_vision.to(torch.int8))

    controller.set_expert_masks(vision_text_masks(text=[0, 1, 2, 3], vision=[6, 7]))
    trace, _ = sample_trace(model, controller, input_ids)
    vision_routes = trace[is_vision].sort(-1).values  # [vision tokens, layers, top_k]
    assert torch.equal(vision_routes, torch.tensor([6, 7], dtype=torch.int16).expand_as(vision_routes))
    assert set(trace[~is_vision].unique().tolist()) <= {0, 1, 2, 3}


# ---------------------------------------------------------------------- generation


def test_generation_records_prefill_then_one_token_per_step():
    """Under `rollout("sample")`, `generate` records `[B, P, L, K]` for prefill, then `[B, 1, L, K]` per step."""
    model, controller = build()
    input_ids = random_ids(batch=3, length=5)
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :2] = 0
    attention_mask[0, :2] = 0
    torch.manual_seed(0)
    with controller.rollout("sample") as recording, torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    assert controller.mode == "topk"
    steps = recording.steps
    assert len(steps) == output.shape[1] - 5 >= 2
    assert steps[0].shape == (3, 5, LAYERS, TOP_K)
    for step in steps[1:]:
        assert step.shape == (3, 1, LAYERS, TOP_K)
    for step in steps:
        assert step.dtype == torch.int16
        assert int(step.min()) >= 0 and int(step.max()) < EXPERTS


# ---------------------------------------------------------------------- errors and cleanup


def _trace_cases():
    """`(name, edit of a good [2, 6, L, K] trace, expected message)` for traces `start_replay` must refuse."""

    def set_value(index, value):
        def edit(trace):
            trace = trace.clone()
            trace[index] = value
            return trace

        return edit

    return [
        ("one layer", lambda t: t[:, :, :1], r"2 MoE layers"),
        ("three layers", lambda t: torch.cat([t, t[:, :, :1]], dim=2), r"2 MoE layers"),
        ("wrong top_k", lambda t: t[..., :1], r"top_k=2"),
        ("not 4-d", lambda t: t[0], r"Routing trace has shape"),
        ("id too large", set_value((0, 1, 0, 0), EXPERTS), r"valid ids are -1"),
        ("id below -1", set_value((1, 2, 1, 1), -2), r"valid ids are -1"),
        ("float dtype", lambda t: t.float(), r"dtype"),
        ("one layer -1", set_value((0, 3, 1), -1), r"only some layers or slots"),
        ("one slot -1", set_value((0, 3, 0, 1), -1), r"only some layers or slots"),
    ]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in _trace_cases()], ids=[c[0] for c in _trace_cases()])
def test_malformed_trace_is_refused(edit, message):
    """`start_replay` raises `MoEGRPOError` with an informative message for a malformed trace, and stays idle."""
    model, controller = build()
    input_ids = random_ids(batch=2, length=6)
    trace, _ = sample_trace(model, controller, input_ids)
    stock = logits_of(model, input_ids)
    with controller.step_scope(), pytest.raises(MoEGRPOError, match=message):
        controller.start_replay(edit(trace))
    assert controller.mode == "topk"
    assert torch.equal(logits_of(model, input_ids), stock)


@pytest.mark.parametrize(
    "calls",
    [[(3, 6)], [(2, 7)], [(2, 5)], [(1, 6), (2, 6)], [(2, 6), (1, 6)]],
    ids=["more rows", "longer", "shorter", "second call overruns", "trace exhausted"],
)
def test_trace_misaligned_with_the_calls_is_refused(calls):
    """A model call whose rows or length differ from what is left of a [2, 6] trace raises, saying misaligned."""
    model, controller = build()
    trace, _ = sample_trace(model, controller, random_ids(batch=2, length=6))
    *fitting, last = calls
    with controller.step_scope():
        controller.start_replay(trace)
        for batch, length in fitting:
            logits_of(model, random_ids(batch=batch, length=length))
        with pytest.raises(MoEGRPOError, match="misaligned"):
            logits_of(model, random_ids(batch=last[0], length=last[1]))


def test_finish_replay_refuses_unconsumed_rows():
    """`finish_replay` after the model consumed 2 of 4 trace rows raises, naming both counts."""
    model, controller = build()
    input_ids = random_ids(batch=4, length=6)
    trace, _ = sample_trace(model, controller, input_ids)
    with controller.step_scope():
        controller.start_replay(trace)
        logits_of(model, input_ids[:2])
        with pytest.raises(MoEGRPOError, match="consumed 2 of 4"):
            controller.finish_replay()


def test_captures_without_replay_are_refused():
    """`captures()` raises when nothing was captured: before any replay, after a topk forward, after the step."""
    model, controller = build()
    input_ids = random_ids(batch=2, length=6)
    with pytest.raises(MoEGRPOError, match="No replayed forward"):
        controller.captures()
    logits_of(model, input_ids)
    with pytest.raises(MoEGRPOError, match="No replayed forward"):
        controller.captures()
    trace, _ = sample_trace(model, controller, input_ids)
    replay(model, controller, input_ids, trace)
    with pytest.raises(MoEGRPOError, match="No replayed forward"):
        controller.captures()


def test_expert_masks_are_checked():
    """Masks of the wrong shape, or leaving fewer than top_k experts for some layer and modality, are refused."""
    _, controller = build()
    masks = vision_text_masks(text=[0, 1, 2], vision=[4, 5])
    controller.set_expert_masks(masks)
    assert torch.equal(controller.expert_masks, masks)

    with pytest.raises(MoEGRPOError, match=r"expected \(2, 2, 8\)"):
        controller.set_expert_masks(masks[:, :1])
    with pytest.raises(MoEGRPOError, match=r"expected \(2, 2, 8\)"):
        controller.set_expert_masks(masks[..., :4])
    too_few = masks.clone()
    too_few[1, 1] = False
    too_few[1, 1, 3] = True
    with pytest.raises(MoEGRPOError, match="fewer than top_k=2"):
        controller.set_expert_masks(too_few)


def test_other_misuse_is_refused():
    """Unknown rollout routing, routers called outside a model call, and layers of different shapes all raise."""
    model, controller = build()
    with pytest.raises(MoEGRPOError, match="Unknown rollout routing"):
        with controller.rollout("replay"):
            pass
    assert controller.mode == "topk"

    hidden = torch.randn(1, 4, 32)
    with controller.rollout("sample"), pytest.raises(MoEGRPOError, match="outside a model call"):
        with torch.no_grad():
            model.model.layers[0].mlp(hidden)

    other = tiny_moe_model("qwen3_moe", seed=0)
    other.model.layers[1].mlp.gate.top_k = 3
    with pytest.raises(MoEGRPOError, match="disagree"):
        RoutingController(other)


@pytest.mark.parametrize("where", ["step_scope", "rollout"])
def test_state_is_cleared_after_an_exception(where):
    """An exception inside `step_scope` (mid-replay) or `rollout` leaves the controller idle and the model stock."""
    model, controller = build()
    input_ids = random_ids(batch=2, length=6)
    stock = logits_of(model, input_ids)
    trace, _ = sample_trace(model, controller, input_ids)

    with pytest.raises(RuntimeError, match="boom"):
        if where == "step_scope":
            with controller.step_scope():
                controller.start_replay(trace)
                logits_of(model, input_ids)
                raise RuntimeError("boom")
        else:
            with controller.rollout("sample"):
                logits_of(model, input_ids)
                raise RuntimeError("boom")

    assert controller.mode == "topk"
    assert torch.equal(logits_of(model, input_ids), stock)
    with pytest.raises(MoEGRPOError):
        controller.captures()
    assert torch.equal(sample_trace(model, controller, input_ids)[0], trace), "the controller is not usable again"


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_top_k_above_the_number_of_experts_is_refused_at_construction(family):
    """transformers' routers would fail only at the first forward (`selected index k out of range`)."""
    from trl_moe_grpo.testing import tiny_moe_config

    model = tiny_moe_model(family, config=tiny_moe_config(family, num_experts_per_tok=EXPERTS + 1))
    with pytest.raises(RuntimeError, match="out of range"):  # the failure the check replaces
        logits_of(model, random_ids())
    with pytest.raises(MoEGRPOError, match=r"top_k=9 of num_experts=8.*num_experts_per_tok"):
        RoutingController(model)
    RoutingController(tiny_moe_model(family, config=tiny_moe_config(family, num_experts_per_tok=EXPERTS)))
