"""The routing-trace contract (`docs/design.md` §3): routes sit exactly where TRL puts the tokens they belong to.

The synthetic tests simulate what `generate` records on a left-padded batch, with every route encoding the
(row, token index) it belongs to, so a route attached to the wrong token is caught by value. The model tests check
the end-to-end consequence: replaying the trace reproduces generation's log-probabilities.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trl.trainer.utils import pad, shuffle_sequence_dict, split_tensor_dict

from trl_moe_grpo.errors import MoEGRPOError
from trl_moe_grpo.routing.controller import RolloutRecording, RoutingController
from trl_moe_grpo.routing.traces import pad_routes, split_rollout_routes
from trl_moe_grpo.testing import tiny_moe_model

LAYERS, TOP_K = 2, 2
PAD_ID = 0
TOKEN_BASE = 1000  # token ids of the synthetic batch: TOKEN_BASE + row * 32 + index, never PAD_ID
GARBAGE = 32000  # what the model routed for a padding token: must never reach a trace


def _token(row: int, index: int) -> int:
    return TOKEN_BASE + row * 32 + index


def _route_of_token(token: torch.Tensor) -> torch.Tensor:
    """`[..., LAYERS, TOP_K]` route that the synthetic recording stores for `token`: distinct per layer and slot."""
    slot = torch.arange(LAYERS * TOP_K).view(LAYERS, TOP_K)
    return ((token - TOKEN_BASE)[..., None, None] * LAYERS * TOP_K + slot).to(torch.int16)


def _garbage(shape) -> torch.Tensor:
    return (GARBAGE + torch.arange(LAYERS * TOP_K).view(LAYERS, TOP_K)).expand(*shape, LAYERS, TOP_K).to(torch.int16)


@st.composite
def generations(draw):
    """Lengths of one `generate` call: unpadded prompt lengths, completion lengths as TRL cuts them, width."""
    batch = draw(st.integers(1, 5))
    prompt_lengths = draw(st.lists(st.integers(1, 7), min_size=batch, max_size=batch))
    width = draw(st.integers(1, 8))  # tokens generate returned per row
    completion_lengths = []
    for _ in range(batch):
        eos = draw(st.one_of(st.none(), st.integers(0, width - 1)))
        completion_lengths.append(width if eos is None else eos + 1)
    # Generation stops when every row is done: some row ran to the full width (EOS last, or no EOS).
    if max(completion_lengths) < width:
        completion_lengths[draw(st.integers(0, batch - 1))] = width
    pad_to_multiple_of = draw(st.sampled_from([None, 4]))
    return prompt_lengths, completion_lengths, width, pad_to_multiple_of


def _simulate_recording(prompt_lengths, completion_lengths, width) -> RolloutRecording:
    """What the controller records: prefill routes every (left-padded) prompt token, decode call j token j - 1."""
    batch, padded = len(prompt_lengths), max(prompt_lengths)
    prefill = _garbage((batch, padded)).clone()
    for row, length in enumerate(prompt_lengths):
        tokens = torch.tensor([_token(row, i) for i in range(length)])
        prefill[row, padded - length :] = _route_of_token(tokens)
    steps = [prefill]
    for j in range(1, width):
        step = _garbage((batch, 1)).clone()
        for row, (prompt_length, completion_length) in enumerate(zip(prompt_lengths, completion_lengths)):
            if j - 1 < completion_length:  # past its EOS a row is fed padding
                step[row, 0] = _route_of_token(torch.tensor(_token(row, prompt_length + j - 1)))
        steps.append(step)
    return RolloutRecording(steps=steps)


def _token_ids(prompt_lengths, completion_lengths, pad_to_multiple_of):
    """`prompt_ids` and `completion_ids` padded as TRL pads them."""
    prompts = [torch.tensor([_token(r, i) for i in range(n)]) for r, n in enumerate(prompt_lengths)]
    completions = [
        torch.tensor([_token(r, p + i) for i in range(n)])
        for r, (p, n) in enumerate(zip(prompt_lengths, completion_lengths))
    ]
    prompt_ids = pad(prompts, padding_value=PAD_ID, padding_side="left", pad_to_multiple_of=pad_to_multiple_of)
    completion_ids = pad(
        completions, padding_value=PAD_ID, padding_side="right", pad_to_multiple_of=pad_to_multiple_of
    )
    return prompt_ids, completion_ids


def _check_routes_follow_tokens(prompt_ids, completion_ids, routes):
    """Every real token carries its own route, except each row's last completion token; the rest is -1."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    assert routes.shape == (*input_ids.shape, LAYERS, TOP_K)
    assert routes.dtype == torch.int16

    # The token ids themselves are laid out as TRL lays them out: prompts left-padded, completions right-padded.
    prompt_real, completion_real = prompt_ids != PAD_ID, completion_ids != PAD_ID
    prompt_positions = torch.arange(prompt_ids.shape[1]).flip(0)
    assert torch.equal(prompt_real, prompt_positions < prompt_real.sum(1, keepdim=True))
    assert torch.equal(completion_real, torch.arange(completion_ids.shape[1]) < completion_real.sum(1, keepdim=True))

    real = input_ids != PAD_ID
    last = torch.zeros_like(real)
    last_index = completion_real.sum(1) - 1
    last[torch.arange(len(last)), prompt_ids.shape[1] + last_index] = True
    routed = real & ~last

    expected = torch.where(
        routed[..., None, None], _route_of_token(input_ids.clamp(min=TOKEN_BASE)), torch.tensor(-1, dtype=torch.int16)
    )
    assert torch.equal(routes, expected)
    assert not (routes >= GARBAGE).any()


@settings(max_examples=100, deadline=None)
@given(generations())
def test_traces_lay_out_like_trl_token_ids(generation):
    prompt_lengths, completion_lengths, width, pad_to_multiple_of = generation
    recording = _simulate_recording(prompt_lengths, completion_lengths, width)
    prompt_routes, completion_routes = split_rollout_routes(recording, prompt_lengths, completion_lengths)

    assert [r.shape[0] for r in prompt_routes] == prompt_lengths
    assert [r.shape[0] for r in completion_routes] == completion_lengths
    routes = pad_routes(prompt_routes, completion_routes, pad_to_multiple_of)
    prompt_ids, completion_ids = _token_ids(prompt_lengths, completion_lengths, pad_to_multiple_of)
    assert routes.shape[:2] == torch.cat([prompt_ids, completion_ids], dim=1).shape
    _check_routes_follow_tokens(prompt_ids, completion_ids, routes)


@settings(max_examples=60, deadline=None)
@given(generations(), st.integers(0, 2**31 - 1), st.data())
def test_traces_follow_their_rows_through_shuffle_and_split(generation, seed, data):
    prompt_lengths, completion_lengths, width, pad_to_multiple_of = generation
    recording = _simulate_recording(prompt_lengths, completion_lengths, width)
    routes = pad_routes(*split_rollout_routes(recording, prompt_lengths, completion_lengths), pad_to_multiple_of)
    prompt_ids, completion_ids = _token_ids(prompt_lengths, completion_lengths, pad_to_multiple_of)
    batch = len(prompt_lengths)
    num_chunks = data.draw(st.sampled_from([n for n in range(1, batch + 1) if batch % n == 0]))

    torch.manual_seed(seed)
    shuffled = shuffle_sequence_dict(
        {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "routed_experts": routes}
    )
    # Rows moved as wholes: the last prompt token of a row (never padding) names the row it came from.
    order = (shuffled["prompt_ids"][:, -1] - TOKEN_BASE) // 32
    assert sorted(order.tolist()) == list(range(batch))
    chunks = split_tensor_dict(shuffled, num_chunks)
    assert sum(chunk["prompt_ids"].shape[0] for chunk in chunks) == batch
    for chunk in chunks:
        _check_routes_follow_tokens(chunk["prompt_ids"], chunk["completion_ids"], chunk["routed_experts"])


def test_split_rollout_routes_rejects_mismatches():
    recording = _simulate_recording([2, 3], [2, 1], 2)
    with pytest.raises(MoEGRPOError, match="No routing was recorded"):
        split_rollout_routes(RolloutRecording(steps=[]), [2, 3], [2, 1])
    with pytest.raises(MoEGRPOError, match="2 rows"):
        split_rollout_routes(recording, [2, 3, 1], [2, 1, 1])
    with pytest.raises(MoEGRPOError, match="Prompt 1 has 4 tokens"):
        split_rollout_routes(recording, [2, 4], [2, 1])
    bad = RolloutRecording(steps=[recording.steps[0], _garbage((2, 2))])
    with pytest.raises(MoEGRPOError, match="KV cache"):
        split_rollout_routes(bad, [2, 3], [2, 1])


# ---------------------------------------------------------------------------------- a real model

VOCAB_LOW, VOCAB_HIGH = 2, 40  # prompt ids; 0 pads, 1 is EOS


@functools.cache
def _model_and_controller():
    model = tiny_moe_model("qwen3_moe")
    return model, RoutingController(model)


def _rollout(model, controller, prompts, max_new_tokens, eos_token_ids, routing="sample"):
    """Generate as TRL does (left-padded prompts), cut completions after the first EOS; return the routes' pieces."""
    prompt_ids = pad(prompts, padding_value=PAD_ID, padding_side="left")
    prompt_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left")
    with torch.no_grad(), controller.rollout(routing) as recording:
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=PAD_ID,
            eos_token_id=eos_token_ids,
        )
    generated = out.sequences[:, prompt_ids.shape[1] :]
    assert len(recording.steps) == generated.shape[1]  # prefill + one call per fed-back token
    is_eos = torch.isin(generated, torch.tensor(eos_token_ids))
    lengths = [int(row.nonzero()[0]) + 1 if row.any() else generated.shape[1] for row in is_eos]
    completions = [generated[r, :n] for r, n in enumerate(lengths)]
    gen_logps = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
    gen_logps = [gen_logps[r, :n].gather(-1, c[:, None])[:, 0] for r, (n, c) in enumerate(zip(lengths, completions))]
    return recording, completions, gen_logps


def _score(model, prompts, completions, pad_to_multiple_of, routes=None, controller=None):
    """Completion log-probs of a full forward on TRL's layout, replaying `routes` when given."""
    left = functools.partial(pad, padding_side="left", pad_to_multiple_of=pad_to_multiple_of)
    right = functools.partial(pad, padding_side="right", pad_to_multiple_of=pad_to_multiple_of)
    prompt_ids = left(prompts, padding_value=PAD_ID)
    prompt_mask = left([torch.ones_like(p) for p in prompts], padding_value=0)
    completion_ids = right(completions, padding_value=PAD_ID)
    completion_mask = right([torch.ones_like(c) for c in completions], padding_value=0)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    with torch.no_grad():
        if routes is None:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        else:
            assert routes.shape[:2] == input_ids.shape
            with controller.step_scope():
                controller.start_replay(routes)
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                controller.finish_replay()
    width = prompt_ids.shape[1]
    logps = torch.log_softmax(logits[:, width - 1 : -1].float(), dim=-1).gather(-1, completion_ids[..., None])[..., 0]
    return [logps[r, : len(c)] for r, c in enumerate(completions)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _replay_diff(model, controller, prompts, completions, recording, gen_logps, pad_to_multiple_of) -> float:
    prompt_routes, completion_routes = split_rollout_routes(
        recording, [len(p) for p in prompts], [len(c) for c in completions]
    )
    routes = pad_routes(prompt_routes, completion_routes, pad_to_multiple_of)
    controller.check_routes(routes)
    replayed = _score(model, prompts, completions, pad_to_multiple_of, routes, controller)
    return _max_diff(replayed, gen_logps)


@st.composite
def model_batches(draw):
    batch = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, 8), min_size=batch, max_size=batch))
    prompts = [
        torch.tensor(draw(st.lists(st.integers(VOCAB_LOW, VOCAB_HIGH - 1), min_size=n, max_size=n))) for n in lengths
    ]
    max_new_tokens = draw(st.integers(1, 6))
    # A second EOS id among the tokens this model likes to emit makes completions end at random places.
    extra_eos = draw(st.one_of(st.none(), st.integers(VOCAB_LOW, 45)))
    eos_token_ids = [1] if extra_eos is None else [1, extra_eos]
    return prompts, max_new_tokens, eos_token_ids, draw(st.sampled_from([None, 4])), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_batches())
def test_replay_reproduces_generation_log_probs(batch):
    prompts, max_new_tokens, eos_token_ids, pad_to_multiple_of, seed = batch
    model, controller = _model_and_controller()
    torch.manual_seed(seed)
    recording, completions, gen_logps = _rollout(model, controller, prompts, max_new_tokens, eos_token_ids)
    diff = _replay_diff(model, controller, prompts, completions, recording, gen_logps, pad_to_multiple_of)
    assert diff <= 1e-5


FIXED_PROMPTS = [
    torch.tensor([5, 17, 3, 22, 9, 30, 11]),
    torch.tensor([8, 2]),
    torch.tensor([39, 14, 27, 6]),
    torch.tensor([12]),
]


def test_replay_is_needed_to_reproduce_sampled_generation():
    """The replay check has teeth: sampled routing scored with stock top-K routing is visibly off."""
    model, controller = _model_and_controller()
    torch.manual_seed(0)
    recording, completions, gen_logps = _rollout(model, controller, FIXED_PROMPTS, 6, [1])
    assert _replay_diff(model, controller, FIXED_PROMPTS, completions, recording, gen_logps, None) <= 1e-5
    stock = _score(model, FIXED_PROMPTS, completions, None)
    assert _max_diff(stock, gen_logps) > 1e-4
    assert controller.mode == "topk"


def test_topk_generation_matches_a_plain_forward():
    """With stock routing, generation (KV cache, left padding) and TRL's full forward agree: the baseline."""
    model, controller = _model_and_controller()
    recording, completions, gen_logps = _rollout(model, controller, FIXED_PROMPTS, 6, [1], routing="topk")
    assert _max_diff(_score(model, FIXED_PROMPTS, completions, 4), gen_logps) <= 1e-5
    assert _replay_diff(model, controller, FIXED_PROMPTS, completions, recording, gen_logps, 4) <= 1e-5


@pytest.mark.parametrize("pad_to_multiple_of", [None, 4])
def test_replay_with_completions_cut_at_eos(pad_to_multiple_of):
    """Rows that stop early: right-padded completions, decode calls past a row's EOS, a -1 last token."""
    model, controller = _model_and_controller()
    torch.manual_seed(1)
    _, first, _ = _rollout(model, controller, FIXED_PROMPTS, 6, [1])
    eos = int(first[0][1])  # a token the model emits at position 1 of row 0 under this seed
    torch.manual_seed(1)  # the same draws again, up to where the new EOS stops a row
    recording, completions, gen_logps = _rollout(model, controller, FIXED_PROMPTS, 6, [1, eos])
    lengths = [len(c) for c in completions]
    assert lengths[0] <= 2
    assert min(lengths) < len(recording.steps)  # some row stopped while another went on
    diff = _replay_diff(model, controller, FIXED_PROMPTS, completions, recording, gen_logps, pad_to_multiple_of)
    assert diff <= 1e-5
