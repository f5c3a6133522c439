"""MoE-GRPO on families of every router rule, built tiny from their transformers configs (see `test_families.py`).

Training, not only replay: Gate-GRPO's gradient through each rule's hooks equals finite differences of the loss, the
trainer's gate loss reaches every router, and a 2-step `MoEGRPOTrainer` run trains each family.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config
from test_trainer import group_rows, with_reward_spread

from trl_moe_grpo import MoEGRPOError, MoEGRPOTrainer, RoutingController
from trl_moe_grpo.losses import clipped_objective, set_log_prob
from trl_moe_grpo.testing.families import build_tiny_family, moe_model_types

INSTALLED = set(moe_model_types())

# One family per router rule (and output contract) the adapters know.
RULE_FAMILIES = {
    "qwen3_next": "softmax",
    "glm4_moe": "sigmoid, bias and group limit",
    "gpt_oss": "top-K then softmax",
    "llama4_text": "sigmoid as dense scores (Llama 4)",
    "phimoe": "sparsemixer",
    "gemma4_text": "probabilities x per-expert scale",
    "deepseek_v4": "sqrt-softplus",
    "dbrx": "logits only, block does top-K",
}
# The families issue 19 names, through the trainer.
NAMED = [
    "qwen3_5_moe_text",
    "qwen3_next",
    "glm4_moe",
    "glm4v_moe",
    "llama4_text",
    "ernie4_5_moe",
    "ernie4_5_vl_moe",
    "kimi_linear",
    "deepseek_v2",
    "minimax",
    "jamba",
    "granitemoe",
    "phimoe",
]


def rank_reward(completions, **kwargs):
    """Rewards that always differ within a group, so every step carries a learning signal (the routing, not the
    reward, is under test here)."""
    return [float(i % 4) for i in range(len(completions))]


# Families whose tiny model trains slowly on a CPU (Kimi-Linear's delta-rule attention runs its torch fallback: ~45 s).
SLOW = {"kimi_linear"}


def installed(families):
    params = []
    for family in families:
        marks = [pytest.mark.skipif(family not in INSTALLED, reason=f"{family} not installed")]
        if family in SLOW:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(family, marks=marks))
    return params


def gate_loss(model, controller, input_ids, routes, old, advantages):
    """Gate-GRPO's per-token clipped objective averaged over tokens and layers, under replay of `routes`."""
    with controller.step_scope():
        controller.start_replay(routes)
        model(input_ids=input_ids)
        captures = controller.captures()
    terms = []
    for layer, (adapter, capture) in enumerate(zip(controller.adapters, captures)):
        log_p = set_log_prob(adapter.selection_log_probs(capture.logits), capture.recorded)
        terms.append(clipped_objective(log_p - old[layer], advantages, "grpo", 0.2, 0.2))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("model_type", ["qwen3_next", "glm4_moe", "gpt_oss", "llama4_text", "dbrx"])
def test_gate_grpo_gradient_equals_finite_differences(model_type):
    """The autograd gradient of Gate-GRPO along a random direction of the router weights equals the central finite
    difference of the loss (model in float64, routes fixed by replay), through each rule's hooks."""
    if model_type not in INSTALLED:
        pytest.skip(f"{model_type} not installed")
    model = build_tiny_family(model_type, seed=0).double()
    model.set_experts_implementation("eager")  # the grouped-GEMM kernels take no float64
    controller = RoutingController(model)
    input_ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), controller.rollout("sample") as recording:
        model(input_ids=input_ids)
    routes = recording.steps[0]
    with torch.no_grad(), controller.step_scope():
        controller.start_replay(routes)
        model(input_ids=input_ids)
        old = [
            set_log_prob(a.selection_log_probs(c.logits), c.recorded).double()
            for a, c in zip(controller.adapters, controller.captures())
        ]
    # Shift the old log-probabilities so every ratio sits inside the clip range with a non-trivial value.
    old = [o + 0.05 for o in old]
    advantages = torch.tensor([1.0, -0.5], dtype=torch.float64).repeat_interleave(6)
    params = controller.router_parameters()
    generator = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]

    loss = gate_loss(model, controller, input_ids, routes, old, advantages)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction) if g is not None)

    # The adapters and the set probabilities compute in float32 (as in training), so the step is large enough that
    # float32 rounding (~1e-7 / eps) stays far below the tolerance; the model itself runs in float64.
    eps = 1e-3
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(float(gate_loss(model, controller, input_ids, routes, old, advantages)))
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic) > 1e-4, "the loss must depend on the routers for the check to bite"
    assert abs(analytic - numeric) <= 1e-3 * abs(numeric) + 1e-6, (analytic, numeric)


def _dense(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[rows, experts]` weights, 0 off the set: compares sets whatever order the slots hold them in."""
    return torch.zeros(indices.shape[0], num_experts, dtype=torch.float32).scatter(-1, indices, weights.float())


@pytest.mark.parametrize("mode", ["sample", "noise", "sinkhorn", "expert_choice"])
@pytest.mark.parametrize("model_type", sorted(RULE_FAMILIES))
def test_training_routings_reach_the_experts_through_every_contract(model_type, mode):
    """The fine-tuning baselines' training routings, through each rule's output contract: what the block hands its
    experts is the drawn set with the weights the mode prescribes (noise: the rule on the noisy logits, V-MoE's noisy
    mixing; expert_choice: the gate probability of each choosing expert, placeholders 0), and padding keeps the stock
    top-K. Logits-only routers (DBRX), whose block takes its own top-K, refuse expert_choice with the reason."""
    if model_type not in INSTALLED:
        pytest.skip(f"{model_type} not installed")
    model = build_tiny_family(model_type, seed=3)
    controller = RoutingController(model)
    if mode == "expert_choice" and any(a.weights_from_logits for a in controller.adapters):
        with pytest.raises(MoEGRPOError, match="expert_choice.*only logits.*own top-K"):
            with controller.training_routing(mode):
                pass
        return
    # What reaches the block: the router output after the controller's hook (hooks run in registration order).
    packed = []
    modules = dict(model.named_modules())
    for layer, name in enumerate(controller.layer_names):
        modules[name].register_forward_hook(lambda m, a, out, layer=layer: packed.append((layer, out)))
    input_ids = torch.randint(3, 60, (3, 8), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    with torch.no_grad(), controller.training_routing(mode, noise_std=1.0, capacity_factor=2.0) as routes:
        model(input_ids=input_ids, attention_mask=attention_mask)
    captures = routes.captures()
    valid = attention_mask.reshape(-1).bool()
    experts = controller.num_experts
    assert [layer for layer, _ in packed] == list(range(controller.num_layers))
    widened = False
    for (layer, output), capture in zip(packed, captures):
        adapter = controller.adapters[layer]
        if isinstance(output, tuple) and len(output) == 2 and output[0].shape == output[1].shape:
            dense = output[0].float()  # Llama 4's (dense scores, logits)
        else:
            _, weights, indices = adapter.unpack(output)  # logits only: the block's own top-K of what it is handed
            dense = _dense(weights, indices, experts)
            if mode == "expert_choice":
                assert torch.equal(indices, capture.dispatched)
            else:
                # The block dispatches exactly the drawn set (slot order aside).
                assert torch.equal(indices.sort(-1).values, capture.dispatched.sort(-1).values)
        dispatched = capture.dispatched
        if mode == "expert_choice":
            widened |= dispatched.shape[1] > controller.top_k
            probs = adapter.selection_log_probs(capture.logits).exp().gather(-1, dispatched)
            expected = _dense(probs * capture.active, dispatched, experts)
        else:
            assert (capture.logit_noise is not None) == (mode == "noise")
            logits = capture.logits if capture.logit_noise is None else capture.logits + capture.logit_noise
            expected = _dense(adapter.mixing_weights(logits, dispatched, like=capture.logits), dispatched, experts)
            if mode == "noise":
                noise_free = _dense(
                    adapter.mixing_weights(capture.logits, dispatched, like=capture.logits), dispatched, experts
                )
                assert not torch.allclose(dense[valid], noise_free[valid]), "the noise must reach the mixing weights"
            assert torch.equal(dispatched[~valid], capture.top_k[~valid])
        torch.testing.assert_close(dense[valid], expected[valid], rtol=1e-5, atol=1e-6)
    if mode == "expert_choice":
        assert widened, "capacity factor 2 should give some token more than top_k experts"


@pytest.mark.parametrize("model_type", installed(sorted(set(RULE_FAMILIES) | set(NAMED))))
def test_moe_grpo_trains_the_family(tmp_path, tokenizer, dataset, model_type):
    """The trainer accepts the family, its gate loss sends finite, non-zero gradients to every router, and a 2-step
    run has finite losses and moves the routers."""
    trainer = MoEGRPOTrainer(
        build_tiny_family(model_type, seed=2, vocab_size=len(tokenizer)),
        rank_reward,
        args=make_config(tmp_path, max_steps=2, max_completion_length=4),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    routers = trainer.routing.router_parameters()
    with trainer._routing_step():
        batch = with_reward_spread(trainer._generate_and_score_completions(group_rows(dataset, 2, 4)), 4)
    trainer.args.gate_loss_coef = 1.0
    model.zero_grad()
    with trainer._routing_step():
        trainer._compute_loss(model, batch).backward()
    for adapter in trainer.routing.adapters:
        grads = [p.grad for p in adapter.router.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert max(float(g.abs().max()) for g in grads) > 0, "every router gets a gradient"
    weights = [p for p in routers if p.grad is not None]

    model.zero_grad()
    before = [p.detach().clone() for p in weights]
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(old, new.detach()) for old, new in zip(before, weights))
