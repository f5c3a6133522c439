"""MoEGRPOTrainer with PEFT: LoRA trains the routers, and the reference pass never stands in for the policy's."""

from __future__ import annotations

import pytest
import torch
from conftest import digit_share, make_config, spread_reward
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors import safe_open

from trl_moe_grpo import MoEGRPOError, MoEGRPOTrainer
from trl_moe_grpo.testing import tiny_moe_model


def group_rows(dataset, num_prompts: int, group: int) -> list[dict]:
    return [dataset[i] for i in range(num_prompts) for _ in range(group)]


def lora(**overrides) -> LoraConfig:
    return LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], **overrides})


def peft_trainer(tmp_path, tokenizer, dataset, model=None, **kwargs):
    config = {"beta": 0.1, "num_iterations": 2, **kwargs.pop("config", {})}
    return MoEGRPOTrainer(
        model if model is not None else tiny_moe_model("qwen3_moe", seed=6),
        kwargs.pop("reward", digit_share),
        args=make_config(tmp_path, **config),
        train_dataset=dataset,
        processing_class=tokenizer,
        **kwargs,
    )


def old_and_live_gate_logps(trainer, dataset):
    """First micro-batch after generation: the old gate log-probs in the batch and the training forward's live ones."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with trainer._routing_step():
        batch = trainer._generate_and_score_completions(group_rows(dataset, 2, 4))
        assert {"old_per_token_logps", "ref_per_token_logps", "old_gate_logps"} <= set(batch)
        trainer._compute_loss(trainer.model, batch)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        live = trainer._gate_log_probs(trainer.routing.captures(), input_ids)
    return batch, live


def assert_old_gate_logps_are_the_policys(batch, live):
    # The reference forward differs from the policy's, so scoring the wrong forward would show.
    assert (batch["ref_per_token_logps"] - batch["old_per_token_logps"]).abs().max() > 1e-2
    valid = batch["routed_experts"][..., 0, 0] >= 0
    gap = (live.detach() - batch["old_gate_logps"]).abs()[valid].max().item()
    assert gap <= 1e-5, f"old gate log-probs differ from the policy's by {gap}"


def test_old_gate_logps_come_from_the_policy_not_the_adapter_free_reference(tmp_path, tokenizer, dataset):
    """beta > 0 with a new LoRA: TRL runs the reference pass (adapters disabled) right after the old-log-prob pass,
    through the same model; the old gate log-probs must still be the policy's."""
    trainer = peft_trainer(tmp_path, tokenizer, dataset, peft_config=lora(init_lora_weights=False))
    assert trainer.ref_model is None
    assert_old_gate_logps_are_the_policys(*old_and_live_gate_logps(trainer, dataset))
    assert trainer._metrics["train"]["gate/clip_ratio"][-1] == 0.0


def test_old_gate_logps_come_from_the_policy_not_the_ref_adapter(tmp_path, tokenizer, dataset):
    """A pretrained adapter (a `PeftModel`): TRL scores the reference with a frozen "ref" copy of it."""
    model = get_peft_model(tiny_moe_model("qwen3_moe", seed=6), lora(target_parameters=["mlp.gate.weight"]))
    trainer = peft_trainer(tmp_path, tokenizer, dataset, model=model)
    assert "ref" in trainer.model.peft_config
    with torch.no_grad():  # the adapter trained on: the "ref" copy no longer equals it
        for name, param in trainer.model.named_parameters():
            if ".default." in name:
                param.add_(0.5 * torch.randn_like(param))
    assert_old_gate_logps_are_the_policys(*old_and_live_gate_logps(trainer, dataset))


def test_lora_trains_the_routers(tmp_path, tokenizer, dataset):
    """A LoRA on the attention only: the trainer adds the routers, which get gradients, move, and are saved."""
    users_config = lora()
    trainer = peft_trainer(
        tmp_path,
        tokenizer,
        dataset,
        peft_config=users_config,
        config={"max_steps": 2, "num_iterations": 1},
        reward=spread_reward,  # every group carries a learning signal, whatever this random model writes
    )
    assert users_config.target_parameters in (None, [])  # the user's config is not changed
    routers = dict(
        (name, param)
        for name, param in trainer.model.named_parameters()
        if param.requires_grad and ".mlp.gate." in name
    )
    assert {id(p) for p in trainer.router_trainable_parameters()} == {id(p) for p in routers.values()}
    assert len(routers) == 2 * trainer.routing.num_layers  # lora_A and lora_B of every router

    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with trainer._routing_step():
        batch = trainer._generate_and_score_completions(group_rows(dataset, 2, 4))
        trainer._compute_loss(trainer.model, batch).backward()
    # LoRA starts with B = 0, so only B gets a gradient at first (A's follows once B has moved).
    lora_b = [param for name, param in routers.items() if "lora_B" in name]
    assert lora_b and all(param.grad is not None and param.grad.abs().sum() > 0 for param in lora_b)
    trainer.model.zero_grad()

    before = {name: param.detach().clone() for name, param in routers.items()}
    trainer.train()
    assert all(not torch.equal(before[name], param.detach()) for name, param in routers.items())

    trainer.save_model(str(tmp_path / "saved"))
    with safe_open(str(tmp_path / "saved" / "adapter_model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert sum(".mlp.gate.lora_" in key for key in saved) == len(routers)


def test_routers_in_modules_to_save_are_refused(tmp_path, tokenizer, dataset):
    with pytest.raises(MoEGRPOError, match="modules_to_save"):
        peft_trainer(tmp_path, tokenizer, dataset, peft_config=lora(modules_to_save=["gate"]))


def test_frozen_routers_with_a_gate_loss_are_refused(tmp_path, tokenizer, dataset):
    """A PEFT method the trainer cannot extend leaves the routers frozen: Gate-GRPO would train nothing."""
    ia3 = IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[])
    with pytest.raises(MoEGRPOError, match="No router parameter is trainable.*target_parameters"):
        peft_trainer(tmp_path, tokenizer, dataset, peft_config=ia3)
    assert peft_trainer(tmp_path, tokenizer, dataset, peft_config=ia3, config={"gate_loss_coef": 0.0})


def test_sft_baseline_under_lora_trains_the_routers(tmp_path, tokenizer, dataset):
    """The fine-tuning baselines under LoRA: the routers are added to the adapter too, and move in training."""
    from trl_moe_grpo import MoESFTConfig, MoESFTTrainer
    from trl_moe_grpo.data_utils import sft_rows_from_answers

    args = MoESFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2, report_to="none",
        use_cpu=True, bf16=False, save_strategy="no", train_routing="sample", seed=0,
    )  # fmt: skip
    trainer = MoESFTTrainer(
        tiny_moe_model("qwen3_moe", seed=6),
        args=args,
        train_dataset=sft_rows_from_answers(dataset.select(range(16))),
        processing_class=tokenizer,
        peft_config=lora(),
    )
    routers = {id(p): p for p in trainer.router_trainable_parameters()}
    assert len(routers) == 2 * trainer.routing.num_layers  # lora_A and lora_B of every router
    before = [p.detach().clone() for p in routers.values()]
    trainer.train()
    assert all(not torch.equal(old, p.detach()) for old, p in zip(before, routers.values()))
