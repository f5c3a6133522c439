"""Gate-GRPO's objective and normalization follow TRL's token loss; the balance loss follows transformers' scale."""

from __future__ import annotations

import collections
import types

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from trl import GRPOTrainer

from trl_moe_grpo.losses import (
    GATE_LOSS_TYPES,
    balance_loss_given_load,
    clipped_objective,
    expert_load,
    reduce_like_trl,
    routed_load_balancing_loss,
)

CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _ratios_and_advantages(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # Log-ratios spread enough that many actions fall outside [1 - eps_low, 1 + eps_high].
    log_ratio = 0.5 * torch.randn(4, 7, generator=generator)
    advantages = torch.randn(4, 1, generator=generator)
    advantages[1] = 0.0
    return log_ratio, advantages


def _trl_clip_formula(log_ratio, advantages, eps_low, eps_high, delta=None):
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * advantages, coef_2 * advantages)


def _trl_sapo_formula(log_ratio, advantages, temperature_pos, temperature_neg):
    coef_1 = torch.exp(log_ratio)
    temperatures = torch.where(advantages > 0, temperature_pos, temperature_neg)
    return -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages


@pytest.mark.parametrize("loss_type", CLIP_LOSS_TYPES)
@pytest.mark.parametrize(("eps_low", "eps_high", "delta"), [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 1.3)])
def test_clipped_objective_matches_trl_token_formula(loss_type, eps_low, eps_high, delta):
    log_ratio, advantages = _ratios_and_advantages()
    ours = clipped_objective(log_ratio, advantages, loss_type, eps_low, eps_high, delta=delta)
    expected = _trl_clip_formula(log_ratio, advantages, eps_low, eps_high, delta)
    assert ours.shape == log_ratio.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_clipped_objective_clips():
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.0])
    loss = clipped_objective(ratio.log(), advantages, "grpo", 0.2, 0.2)
    # Positive advantage: the ratio is capped at 1.2; negative: floored at 0.8; otherwise the raw ratio counts.
    torch.testing.assert_close(loss, torch.tensor([-1.2, -0.5, 0.8, 1.5, -1.0]))


@pytest.mark.parametrize(("temperature_pos", "temperature_neg"), [(1.0, 1.05), (0.5, 2.0)])
def test_clipped_objective_sapo_matches_trl(temperature_pos, temperature_neg):
    log_ratio, advantages = _ratios_and_advantages(seed=1)
    ours = clipped_objective(
        log_ratio,
        advantages,
        "sapo",
        0.2,
        0.2,
        sapo_temperature_pos=temperature_pos,
        sapo_temperature_neg=temperature_neg,
    )
    expected = _trl_sapo_formula(log_ratio, advantages, temperature_pos, temperature_neg)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # On policy (ratio 1) SAPO's gradient through the ratio is -A, like the clipped objective's.
    zero = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    clipped_objective(zero, adv, "sapo", 0.2, 0.2).sum().backward()
    torch.testing.assert_close(zero.grad, -adv)


@pytest.mark.parametrize("loss_type", ["cispo", "vespo", "luspo", "nope"])
def test_clipped_objective_rejects_unsupported_loss_types(loss_type):
    with pytest.raises(ValueError, match="supported"):
        clipped_objective(torch.zeros(2, 3), torch.ones(2, 1), loss_type, 0.2, 0.2)


def _per_position_and_mask(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    per_position = torch.randn(3, 6, generator=generator)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]],
        dtype=torch.int64,
    )
    return per_position, mask


def test_reduce_like_trl_hand_computed():
    per_position, mask = _per_position_and_mask()
    m = mask.float()
    rows = [(per_position[i] * m[i]).sum() / m[i].sum() for i in range(3)]
    total = (per_position * m).sum()

    for loss_type in ("grpo", "sapo"):
        got = reduce_like_trl(per_position, mask, loss_type, 2.0, 10, 99.0)
        torch.testing.assert_close(got, torch.stack(rows).mean() / 2.0)
    torch.testing.assert_close(reduce_like_trl(per_position, mask, "bnpo", 2.0, 10, 99.0), total / 12 / 2.0)
    torch.testing.assert_close(reduce_like_trl(per_position, mask, "dr_grpo", 2.0, 10, 99.0), total / (3 * 10) / 2.0)
    torch.testing.assert_close(reduce_like_trl(per_position, mask, "dapo", 2.0, 10, 7.0), total / 7.0)
    torch.testing.assert_close(
        reduce_like_trl(per_position, mask, "dapo", 2.0, 10, torch.tensor(7.0)), total / torch.tensor(7.0)
    )


def test_reduce_like_trl_empty_rows_do_not_divide_by_zero():
    per_position, mask = _per_position_and_mask()
    mask[1] = 0
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        assert torch.isfinite(reduce_like_trl(per_position, mask, loss_type, 1.0, 6, 5.0))
    assert reduce_like_trl(per_position, torch.zeros_like(mask), "bnpo", 1.0, 6, 5.0).item() == 0.0


def test_reduce_like_trl_rejects_unknown_loss_type():
    per_position, mask = _per_position_and_mask()
    with pytest.raises(ValueError, match="supported"):
        reduce_like_trl(per_position, mask, "cispo", 1.0, 6, 5.0)


class _Identity:
    """Just enough of an `Accelerator` for `GRPOTrainer._compute_loss` in one process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(loss_type, per_token_logps, old_logps, advantages, mask, *, training, steps, max_length, items):
    """Run TRL's own `GRPOTrainer._compute_loss` on given log-probabilities, with a stand-in trainer."""
    accumulation, per_generation = steps
    args = types.SimpleNamespace(
        delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, steps_per_generation=per_generation
    )
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=0.0,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        args=args,
        use_vllm=False,
        model=types.SimpleNamespace(training=training),
        current_gradient_accumulation_steps=accumulation,
        max_completion_length=max_length,
        accelerator=_Identity(),
        _entropy_bonus_enabled=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )
    batch, width = per_token_logps.shape
    inputs = {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.zeros(batch, width, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "num_items_in_batch": torch.tensor(float(items)),
    }
    return GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("loss_type", GATE_LOSS_TYPES)
@pytest.mark.parametrize("training", [True, False])
def test_objective_and_reduction_equal_trl_compute_loss(loss_type, training):
    """Fed token log-probs, our two functions give what TRL's `_compute_loss` gives: values and gradients."""
    generator = torch.Generator().manual_seed(3)
    per_position, mask = _per_position_and_mask()
    logps = (-torch.rand(3, 6, generator=generator)).requires_grad_(True)
    old = logps.detach() + 0.4 * torch.randn(3, 6, generator=generator)
    advantages = torch.randn(3, generator=generator)
    accumulation, per_generation, max_length, items = 4, 2, 9, 40
    expected = _trl_loss(
        loss_type,
        logps,
        old,
        advantages,
        mask,
        training=training,
        steps=(accumulation, per_generation),
        max_length=max_length,
        items=items,
    )
    (expected_grad,) = torch.autograd.grad(expected, logps)

    steps = accumulation if training else 1.0
    # TRL's dapo normalizer: items of the generation batch, per process, per accumulation window (train only).
    dapo_normalizer = items * accumulation / per_generation if training else items
    per_token = clipped_objective(logps - old, advantages[:, None], loss_type, 0.2, 0.28)
    ours = reduce_like_trl(per_token, mask, loss_type, steps, max_length, dapo_normalizer)
    (ours_grad,) = torch.autograd.grad(ours, logps)

    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours_grad, expected_grad)


# ---------------------------------------------------------------------------------- load balancing


def test_load_balancing_is_top_k_when_balanced():
    num_experts, top_k, rows = 4, 2, 8
    probs = torch.full((3, rows, num_experts), 1 / num_experts)
    # Every expert gets exactly rows * top_k / num_experts slots in every layer.
    dispatched = torch.tensor([[e % num_experts, (e + 1) % num_experts] for e in range(rows)]).expand(3, rows, top_k)
    loss = routed_load_balancing_loss(probs, dispatched, torch.ones(rows), num_experts)
    assert loss.item() == pytest.approx(top_k, abs=1e-6)


def test_load_balancing_penalizes_collapse():
    num_experts, top_k, rows = 8, 2, 16
    logits = torch.randn(1, rows, num_experts, generator=torch.Generator().manual_seed(0))
    logits[..., :2] += 5.0
    probs = torch.softmax(logits, -1)
    collapsed = torch.tensor([0, 1]).expand(1, rows, top_k)
    spread = torch.stack([torch.arange(rows) % num_experts, (torch.arange(rows) + 1) % num_experts], -1)[None]
    uniform = torch.full_like(probs, 1 / num_experts)
    balanced = routed_load_balancing_loss(uniform, spread, torch.ones(rows), num_experts)
    loss = routed_load_balancing_loss(probs, collapsed, torch.ones(rows), num_experts)
    assert loss > balanced + 1.0
    # Worst case: everything to two experts that carry all the probability.
    assert loss.item() <= num_experts * top_k / 2 + 1e-5


def test_load_balancing_ignores_masked_tokens():
    generator = torch.Generator().manual_seed(1)
    layers, rows, num_experts, top_k = 2, 10, 6, 2
    probs = torch.softmax(torch.randn(layers, rows, num_experts, generator=generator), -1)
    dispatched = torch.stack(
        [torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(layers * rows)]
    ).view(layers, rows, top_k)
    token_mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0])
    loss = routed_load_balancing_loss(probs, dispatched, token_mask, num_experts)

    masked = token_mask == 0
    other_probs = probs.clone()
    other_probs[:, masked] = torch.softmax(10 * torch.randn(layers, int(masked.sum()), num_experts), -1)
    other_dispatched = dispatched.clone()
    other_dispatched[:, masked] = torch.tensor([0, 1])
    other = routed_load_balancing_loss(other_probs, other_dispatched, token_mask, num_experts)
    torch.testing.assert_close(loss, other)

    # Dropping the masked rows altogether gives the same loss.
    kept = token_mask == 1
    dropped = routed_load_balancing_loss(probs[:, kept], dispatched[:, kept], token_mask[kept], num_experts)
    torch.testing.assert_close(loss, dropped)


def test_load_balancing_averages_layers():
    generator = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(3, 5, 4, generator=generator), -1)
    dispatched = torch.topk(probs, 2, -1).indices
    mask = torch.ones(5)
    per_layer = [routed_load_balancing_loss(probs[i : i + 1], dispatched[i : i + 1], mask, 4) for i in range(3)]
    torch.testing.assert_close(routed_load_balancing_loss(probs, dispatched, mask, 4), torch.stack(per_layer).mean())


@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (6, 1), (4, 3)])
def test_load_balancing_matches_transformers_for_top_k_dispatch(num_experts, top_k):
    logits = 2 * torch.randn(20, num_experts, generator=torch.Generator().manual_seed(num_experts))
    probs = torch.softmax(logits, -1)
    dispatched = torch.topk(probs, top_k, dim=-1).indices
    ours = routed_load_balancing_loss(probs[None], dispatched[None], torch.ones(20), num_experts)
    reference = load_balancing_loss_func((logits,), num_experts, top_k)
    torch.testing.assert_close(ours, reference)


def test_load_balancing_matches_transformers_with_a_mask():
    num_experts, top_k = 8, 2
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    logits = torch.randn(10, num_experts, generator=torch.Generator().manual_seed(7))
    probs = torch.softmax(logits, -1)
    dispatched = torch.topk(probs, top_k, dim=-1).indices
    ours = routed_load_balancing_loss(probs[None], dispatched[None], attention_mask.reshape(-1), num_experts)
    reference = load_balancing_loss_func((logits,), num_experts, top_k, attention_mask)
    torch.testing.assert_close(ours, reference)


def test_load_balancing_with_the_batch_load_adds_up_over_micro_batches():
    """With the whole batch's expert load fixed, the parts' losses (each divided by the batch's token count) sum to
    the batch's loss, values and gradients: gradient accumulation does not change it."""
    generator = torch.Generator().manual_seed(3)
    layers, rows, num_experts, top_k = 3, 12, 6, 2
    logits = torch.randn(layers, rows, num_experts, generator=generator, requires_grad=True)
    dispatched = torch.rand(layers, rows, num_experts, generator=generator).argsort(-1)[..., :top_k]
    token_mask = torch.rand(rows, generator=generator) < 0.75
    dispatched[:, ~token_mask] = -1  # padding holds -1 in a trace: never read
    whole = routed_load_balancing_loss(logits.softmax(-1), dispatched, token_mask, num_experts)
    (whole_grad,) = torch.autograd.grad(whole, logits)

    count = token_mask.sum()
    load = expert_load(dispatched, token_mask, num_experts) / count
    assert torch.allclose(load.sum(-1), torch.full((layers,), float(top_k)))
    parts = [slice(0, 5), slice(5, 12)]
    total = sum(
        balance_loss_given_load(logits[:, part].softmax(-1), token_mask[part], load, num_experts) / count
        for part in parts
    )
    (parts_grad,) = torch.autograd.grad(total, logits)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(parts_grad, whole_grad)
