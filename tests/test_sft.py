"""MoESFTTrainer: the fine-tuning baselines, equal to TRL's SFT under top-K, exact under checkpointing, on InternVL."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from trl import SFTConfig, SFTTrainer

from trl_moe_grpo import MoEGRPOError, MoESFTConfig, MoESFTTrainer
from trl_moe_grpo.data_utils import sft_rows_from_answers
from trl_moe_grpo.demo.visual_mc import visual_mc_rows
from trl_moe_grpo.losses import routed_load_balancing_loss
from trl_moe_grpo.testing import build_tiny_internvl_processor, tiny_dense_model, tiny_moe_internvl, tiny_moe_model
from trl_moe_grpo.trainer.sft_config import ROUTING_FILE

MODES = ["topk", "sample", "noise", "expert_choice", "sinkhorn"]


def sft_values(tmp_path, **overrides) -> dict:
    """Arguments shared by `MoESFTConfig` and `trl.SFTConfig` here: tiny batches, CPU, fp32, no balance loss."""
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        router_aux_loss_coef=0.0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return values


def sum_rows(n: int) -> list[dict]:
    """MoE-GRPO-style text rows; any 4 consecutive ones have prompts of 4 different lengths, so batches pad."""
    rows = []
    for i in range(n):
        a, b = int("9" * (1 + i % 4)) - i, i % 10
        rows.append({"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)})
    return rows


@pytest.fixture(scope="module")
def text_rows():
    return sft_rows_from_answers(Dataset.from_list(sum_rows(16)))


def text_trainer(tmp_path, tokenizer, rows, model=None, trainer_cls=MoESFTTrainer, **overrides):
    config_cls = MoESFTConfig if trainer_cls is MoESFTTrainer else SFTConfig
    return trainer_cls(
        model if model is not None else tiny_moe_model("qwen3_moe", seed=1),
        args=config_cls(**sft_values(tmp_path, **overrides)),
        train_dataset=rows,
        processing_class=tokenizer,
    )


def first_batch(trainer) -> dict:
    """The collated first 4 training rows (prompts of 4 different lengths)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert bool((batch["attention_mask"] == 0).any()), "the batch should carry padding"
    return batch


def router_weights(trainer) -> list[torch.nn.Parameter]:
    return [adapter.router.weight for adapter in trainer.routing.adapters]


def step_grads(trainer, batch, checkpointing: bool = True, seed: int = 0):
    """One `training_step` from zero gradients: `(loss, {name: grad})`."""
    model = trainer.model
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = 1
    num_items = (batch["labels"][:, 1:] != -100).sum()
    torch.manual_seed(seed)
    loss = trainer.training_step(model, dict(batch), num_items)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------- equivalence and exactness


def test_topk_routing_equals_trl_sft(tmp_path, tokenizer, text_rows):
    """train_routing='topk', no balance loss: the same loss and gradients as trl.SFTTrainer, checkpointing on."""
    moe = text_trainer(tmp_path, tokenizer, text_rows)
    sft = text_trainer(tmp_path, tokenizer, text_rows, trainer_cls=SFTTrainer)
    batch = first_batch(moe)
    moe_loss, moe_grads = step_grads(moe, batch)
    sft_loss, sft_grads = step_grads(sft, batch)

    assert math.isfinite(moe_loss.item()) and torch.equal(moe_loss, sft_loss)
    assert moe_grads.keys() == sft_grads.keys()
    for name, grad in moe_grads.items():
        assert torch.equal(grad, sft_grads[name]), name
    assert all(name in moe_grads for name, p in moe.model.named_parameters() if p in set(router_weights(moe)))


@pytest.mark.parametrize("mode", ["sample", "expert_choice", "noise"])
def test_training_step_is_exact_under_gradient_checkpointing(tmp_path, tokenizer, text_rows, mode):
    """Same seed, same batch: checkpoint recompute inside `training_step` gives the gradients of a plain backward."""
    trainer = text_trainer(tmp_path, tokenizer, text_rows, train_routing=mode, router_aux_loss_coef=0.1)
    batch = first_batch(trainer)
    plain_loss, plain = step_grads(trainer, batch, checkpointing=False)
    loss, grads = step_grads(trainer, batch, checkpointing=True)
    assert trainer._metrics["train"]["routing/dispatched_differs_from_topk"][-1] > 0.1
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=1e-6)
    assert grads.keys() == plain.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_balance_loss_is_computed_on_the_dispatched_sets(tmp_path, tokenizer, text_rows):
    """Sampled routing: the added term is coef * the Switch loss of the sampled sets, not of the live top-K."""
    trainer = text_trainer(tmp_path, tokenizer, text_rows, train_routing="sample", router_aux_loss_coef=0.5)
    assert trainer.balance_loss_coef == 0.5 and not trainer.aux_loss_enabled
    batch = trainer._prepare_inputs(first_batch(trainer))
    model = trainer.model.train()
    with trainer.routing_step() as routes:
        trainer.balance_loss_coef = 0.0
        base = trainer.compute_loss(model, dict(batch))
        trainer.balance_loss_coef = 0.5
        total = trainer.compute_loss(model, dict(batch))  # same batch, same routes
        captures = routes.captures()
        probs = torch.stack(
            [a.selection_log_probs(c.logits) for a, c in zip(trainer.routing.adapters, captures)]
        ).exp()
        valid = captures[0].valid
        dispatched = torch.stack([c.dispatched for c in captures])
        expected = routed_load_balancing_loss(probs, dispatched, valid, trainer.routing.num_experts)
        on_top_k = routed_load_balancing_loss(
            probs, torch.stack([c.top_k for c in captures]), valid, trainer.routing.num_experts
        )
        router_grads = torch.autograd.grad(total - base, router_weights(trainer))

    torch.testing.assert_close(total - base, 0.5 * expected, rtol=1e-5, atol=1e-6)
    assert abs(expected.item() - on_top_k.item()) > 1e-3, "sampled and top-K sets should load experts differently"
    assert trainer._metrics["train"]["routing/balance_loss"][-1] == pytest.approx(expected.item(), rel=1e-5)
    assert all(bool(g.abs().sum() > 0) for g in router_grads)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_balance_loss_counts_only_weighted_slots(layers, rows, experts, seed):
    """All slots active: the loss without a slot mask. Otherwise the Switch formula over the active slots."""
    generator = torch.Generator().manual_seed(seed)
    top_k = 1 + seed % experts
    probs = torch.softmax(torch.randn(layers, rows, experts, generator=generator), dim=-1)
    dispatched = torch.rand(layers, rows, experts, generator=generator).argsort(-1)[..., :top_k]
    token_mask = torch.rand(rows, generator=generator) < 0.8
    active = torch.ones_like(dispatched, dtype=torch.bool)
    torch.testing.assert_close(
        routed_load_balancing_loss(probs, dispatched, token_mask, experts, active),
        routed_load_balancing_loss(probs, dispatched, token_mask, experts),
    )
    active = torch.rand(layers, rows, top_k, generator=generator) < 0.6
    weight = token_mask.float()
    count = weight.sum().clamp(min=1)
    expected = []
    for layer in range(layers):
        load = torch.zeros(experts)
        for row in range(rows):
            for slot in range(top_k):
                if active[layer, row, slot] and token_mask[row]:
                    load[dispatched[layer, row, slot]] += 1
        mean_prob = (probs[layer] * weight[:, None]).sum(0) / count
        expected.append(experts * (load / count * mean_prob).sum())
    torch.testing.assert_close(
        routed_load_balancing_loss(probs, dispatched, token_mask, experts, active), torch.stack(expected).mean()
    )


def test_expert_choice_balance_loss_over_variable_slots_and_drop_warning(tmp_path, tokenizer, text_rows, caplog):
    """Expert Choice layers each get their own slot width; the balance loss counts the weighted slots of every layer
    (reference: per-layer loads from the captures), and a capacity factor that drops most tokens is warned about once,
    naming the share and the fix."""
    options = dict(train_routing="expert_choice", router_aux_loss_coef=0.5, expert_capacity_factor=2)
    trainer = text_trainer(tmp_path, tokenizer, text_rows, **options)
    batch = trainer._prepare_inputs(first_batch(trainer))
    model = trainer.model.train()
    with trainer.routing_step() as routes:
        trainer.compute_loss(model, dict(batch))
    captures = routes.captures()
    assert max(c.dispatched.shape[1] for c in captures) > trainer.routing.top_k  # some token took more than K
    valid = captures[0].valid.float()
    expected = []
    for adapter, capture in zip(trainer.routing.adapters, captures):
        ids = capture.dispatched[capture.active & capture.valid[:, None]]
        load = torch.bincount(ids, minlength=trainer.routing.num_experts).float() / valid.sum()
        mean_prob = (adapter.selection_log_probs(capture.logits).exp() * valid[:, None]).sum(0) / valid.sum()
        expected.append(trainer.routing.num_experts * (load * mean_prob).sum())
    logged = trainer._metrics["train"]["routing/balance_loss"][-1]
    assert logged == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    # Capacity factor 2: 2 K experts per token on average.
    assert trainer._metrics["train"]["routing/experts_per_token"][-1] > trainer.routing.top_k

    starved = text_trainer(tmp_path, tokenizer, text_rows, train_routing="expert_choice", expert_capacity_factor=0.01)
    starved.current_gradient_accumulation_steps = trainer.current_gradient_accumulation_steps = 1
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            starved.model.zero_grad()
            starved.training_step(starved.model.train(), dict(first_batch(starved)))
    warnings = [r.getMessage() for r in caplog.records if "no expert took" in r.getMessage()]
    dropped = starved._metrics["train"]["routing/dropped_tokens"]
    assert len(warnings) == 1 and len(dropped) == 2 and dropped[0] > 0.5
    assert f"{dropped[0]:.0%}" in warnings[0] and "expert_capacity_factor=0.01" in warnings[0]
    with caplog.at_level(logging.WARNING):
        trainer.training_step(model, dict(first_batch(trainer)))
    assert len([r for r in caplog.records if "no expert took" in r.getMessage()]) == 1  # factor 2: no warning


# ---------------------------------------------------------------------- end to end on a vision-language MoE


@pytest.fixture(scope="module")
def processor():
    return build_tiny_internvl_processor()


@pytest.fixture(scope="module")
def visual_rows():
    """The real visual multiple-choice task (an image per row), as SFT rows: 8 to train, 4 to evaluate."""
    rows = sft_rows_from_answers(Dataset.from_list(visual_mc_rows(12, seed=0)))
    return rows.select(range(8)), rows.select(range(8, 12))


@pytest.mark.parametrize("mode", MODES)
def test_internvl_trains_with_images_in_every_routing(tmp_path, processor, visual_rows, mode):
    """Two steps with images and a balance loss: finite losses, routers move, metrics, options saved, eval is top-K."""
    train, evaluation = visual_rows
    trainer = MoESFTTrainer(
        tiny_moe_internvl(seed=0),
        args=MoESFTConfig(
            **sft_values(tmp_path, router_aux_loss_coef=0.01, per_device_eval_batch_size=4),
            train_routing=mode,
            expert_capacity_factor=0.75,
        ),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=processor,
    )
    before = [w.detach().clone() for w in router_weights(trainer)]
    trainer.train()

    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    for old, new in zip(before, router_weights(trainer)):
        assert not torch.equal(old, new.detach())
    for key in ("routing/balance_loss", "routing/entropy", "routing/dispatched_differs_from_topk"):
        assert key in logs[0]
    assert "aux_loss" not in logs[0]  # TRL's own MoE loss stays off
    differs = logs[0]["routing/dispatched_differs_from_topk"]
    assert differs == 0.0 if mode == "topk" else differs > 0.05
    assert (
        ("routing/dropped_tokens" in logs[0]) == ("routing/experts_per_token" in logs[0]) == (mode == "expert_choice")
    )

    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["eval_routing/dispatched_differs_from_topk"] == 0.0  # evaluation routes like inference

    trainer.save_model()
    saved = json.loads((tmp_path / ROUTING_FILE).read_text())
    assert saved["train_routing"] == mode and saved["router_aux_loss_coef"] == 0.01
    assert saved["expert_capacity_factor"] == 0.75 and saved["sinkhorn_iterations"] == 3
    assert saved["routing_noise_std"] is None and saved["noisy_mixing_weights"] is True  # V-MoE's defaults


# ---------------------------------------------------------------------- options, data and errors


def test_router_learning_rate_gets_its_own_param_group(tmp_path, tokenizer, text_rows):
    trainer = text_trainer(
        tmp_path, tokenizer, text_rows, learning_rate=1e-5, router_learning_rate=3e-3, lr_scheduler_type="constant"
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    routers = {id(p) for p in trainer.routing.router_parameters()}
    by_lr: dict[float, set[int]] = {}
    for group in trainer.optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(id(p) for p in group["params"])
    assert by_lr.pop(3e-3) == routers and routers
    assert set(by_lr) == {1e-5} and not by_lr[1e-5] & routers
    assert len(by_lr[1e-5]) + len(routers) == sum(1 for p in trainer.model.parameters() if p.requires_grad)


def test_sft_rows_from_answers():
    """Conversational prompts get an assistant message, plain prompts the answer string; other columns stay."""
    conversational = [{"prompt": [{"role": "user", "content": "1+2="}], "answer": 3, "task": "sum"}]
    (row,) = sft_rows_from_answers(conversational)
    assert row["completion"] == [{"role": "assistant", "content": "3"}] and row["task"] == "sum"
    plain = sft_rows_from_answers(Dataset.from_list([{"prompt": "1+2=", "label": "3"}]), answer_column="label")
    assert plain[0]["completion"] == "3"
    visual = sft_rows_from_answers(Dataset.from_list(visual_mc_rows(2)))
    assert visual[0]["completion"] == [{"role": "assistant", "content": visual[0]["answer"]}]
    assert visual[0]["images"]

    with pytest.raises(MoEGRPOError, match="answer_column"):
        sft_rows_from_answers([{"prompt": "1+2="}])
    with pytest.raises(MoEGRPOError, match="already have a `completion`"):
        sft_rows_from_answers(Dataset.from_list([{"prompt": "1+2=", "answer": "3", "completion": "3"}]))


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (None, r"is None.*'None'"),
        (["A", "B"], r"is a list.*\"\['A', 'B'\]\""),
        ({"a": 1}, "is a dict"),
        (True, "bool"),
    ],
)
def test_sft_rows_from_answers_refuses_answers_that_are_not_one_string(answer, message):
    """`str` would make `None` the target "None" and a list its repr: refused, in lists and in `datasets` alike."""
    with pytest.raises(MoEGRPOError, match=message):
        sft_rows_from_answers([{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": answer}])
    with pytest.raises(MoEGRPOError, match="sft_rows_from_answers"):
        sft_rows_from_answers(Dataset.from_list([{"prompt": "1+2=", "answer": answer}]))
    assert sft_rows_from_answers([{"prompt": "1+2=", "answer": 3.5}])[0]["completion"] == "3.5"


@pytest.mark.parametrize("as_list", [False, True])
def test_grpo_rows_without_completions_are_refused_with_the_fix(tmp_path, tokenizer, as_list):
    """Prompt + answer rows would fail inside TRL's tokenization with a bare `KeyError: 'completion'`."""
    rows = sum_rows(4) if as_list else Dataset.from_list(sum_rows(4))
    with pytest.raises(MoEGRPOError, match=r"`train_dataset` rows .* no `completion`.*sft_rows_from_answers"):
        text_trainer(tmp_path, tokenizer, rows)
    with pytest.raises(MoEGRPOError, match=r"eval_dataset\['held_out'\].*sft_rows_from_answers"):
        MoESFTTrainer(
            tiny_moe_model("qwen3_moe", seed=1),
            MoESFTConfig(**sft_values(tmp_path)),
            None,
            sft_rows_from_answers(rows),
            {"held_out": rows},
            processing_class=tokenizer,
        )


def test_dense_model_and_unknown_router_are_rejected(tmp_path, tokenizer, text_rows):
    with pytest.raises(MoEGRPOError, match="no Mixture-of-Experts router"):
        text_trainer(tmp_path, tokenizer, text_rows, model=tiny_dense_model("qwen3"), router_aux_loss_coef=0.01)

    model = tiny_moe_model("qwen3_moe")
    gate = model.model.layers[0].mlp.gate

    def forward(self, hidden_states):  # weights no known scoring rule gives (a known rule would be recognized)
        logits, weights, indices = type(self).__mro__[1].forward(self, hidden_states)
        return logits, weights.square(), indices

    gate.__class__ = type("CustomTopKRouter", (type(gate),), {"forward": forward})
    with pytest.raises(MoEGRPOError, match="CustomTopKRouter.*scoring rules"):
        text_trainer(tmp_path, tokenizer, text_rows, model=model)


def test_plain_sft_config_is_rejected(tmp_path, tokenizer, text_rows):
    with pytest.raises(MoEGRPOError, match="MoESFTConfig"):
        MoESFTTrainer(tiny_moe_model(), args=SFTConfig(**sft_values(tmp_path)), train_dataset=text_rows)


def test_compute_loss_outside_a_training_step_is_refused_for_drawn_routes(tmp_path, tokenizer, text_rows):
    """In training mode a sampled forward outside `training_step`/`routing_step` could not be recomputed: refused."""
    trainer = text_trainer(tmp_path, tokenizer, text_rows, train_routing="sample")
    batch = trainer._prepare_inputs(first_batch(trainer))
    trainer.model.train()
    with pytest.raises(MoEGRPOError, match="routing_step"):
        trainer.compute_loss(trainer.model, dict(batch))
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(batch))  # evaluation: stock top-K
    assert trainer._metrics["eval"]["routing/dispatched_differs_from_topk"] == [0.0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train_routing": "replay"}, "train_routing"),
        ({"routing_noise_std": 0.0}, "routing_noise_std"),
        ({"expert_capacity_factor": 0.0}, "expert_capacity_factor"),
        ({"sinkhorn_iterations": 0}, "sinkhorn_iterations"),
        ({"router_learning_rate": -1.0}, "router_learning_rate"),
        ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef"),
        ({"use_liger_kernel": True}, "use_liger_kernel"),
        ({"gradient_checkpointing_kwargs": {"use_reentrant": True}}, "use_reentrant"),
    ],
)
def test_invalid_options_are_explained(tmp_path, overrides, message):
    with pytest.raises(MoEGRPOError, match=message):
        MoESFTConfig(**sft_values(tmp_path, **overrides))
