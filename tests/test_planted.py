"""The mechanism test: routing RL must find rewarded experts that lie outside the initial top-K.

On the planted task (`trl_moe_grpo.testing.planted`) the answer is right only when the router sends the prompt token
to expert 6 or 7, which its top-2 never does, and the token loss cannot reach the routers. MoE-GRPO (sampled rollouts,
Gate-GRPO) must move the top-K onto the rewarded experts in five steps; Det-FT and GRPO with top-K routing, which
never route those experts, must not move them at all, and neither must MoE-GRPO with Gate-GRPO or sampled routing
turned off. Exactness tests (replay, loss parity with TRL) cannot see a regression of the method itself; this can.
"""

import pytest
import torch
from conftest import config_values
from trl import GRPOConfig, GRPOTrainer

from trl_moe_grpo import MoEGRPOConfig, MoEGRPOTrainer, MoESFTConfig, MoESFTTrainer
from trl_moe_grpo.data_utils import sft_rows_from_answers
from trl_moe_grpo.testing import build_char_tokenizer
from trl_moe_grpo.testing.planted import (
    REWARDED_EXPERTS,
    planted_accuracy,
    planted_dataset,
    planted_moe_model,
    planted_reward,
    rewarded_top_k_share,
)

STEPS = 5
# Two prompts of 8 rollouts per step: about 86% of groups of 8 hold a rollout that routed a rewarded expert.
GRPO_VALUES = dict(
    per_device_train_batch_size=16,
    num_generations=8,
    max_completion_length=1,
    max_steps=STEPS,
    learning_rate=0.1,
)


def rewarded_logits(model) -> torch.Tensor:
    return model.model.layers[0].mlp.gate.weight[list(REWARDED_EXPERTS)].detach().clone()


def test_construction_hides_the_rewarded_experts():
    model = planted_moe_model()
    assert rewarded_top_k_share(model) == 0.0 and planted_accuracy(model) == 0.0
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["model.layers.0.mlp.gate.weight"]
    # Routing one rewarded expert by hand answers right: the answer depends on the routing alone.
    model.model.layers[0].mlp.gate.weight.data[REWARDED_EXPERTS[0], 0] = 1.0
    assert rewarded_top_k_share(model) == 0.5 and planted_accuracy(model) == 1.0


def test_moe_grpo_moves_the_top_k_onto_the_rewarded_experts(tmp_path):
    model = planted_moe_model()
    trainer = MoEGRPOTrainer(
        model,
        planted_reward,
        args=MoEGRPOConfig(**config_values(tmp_path, **GRPO_VALUES)),
        train_dataset=planted_dataset(),
        processing_class=build_char_tokenizer(),
    )
    trainer.train()
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    assert len(rewards) == STEPS and rewards[0] < 0.5 < rewards[-1]
    assert rewarded_top_k_share(model) >= 0.5
    assert planted_accuracy(model) == 1.0


@pytest.mark.parametrize(
    "ablation",
    [dict(gate_loss_coef=0.0), dict(rollout_routing="topk")],
    ids=["without-gate-grpo", "without-sampled-routing"],
)
def test_moe_grpo_ablations_cannot_find_the_rewarded_experts(tmp_path, ablation):
    model = planted_moe_model()
    before = rewarded_logits(model)
    trainer = MoEGRPOTrainer(
        model,
        planted_reward,
        args=MoEGRPOConfig(**config_values(tmp_path, **GRPO_VALUES), **ablation),
        train_dataset=planted_dataset(),
        processing_class=build_char_tokenizer(),
    )
    trainer.train()
    assert torch.allclose(rewarded_logits(model), before, atol=1e-6)
    assert rewarded_top_k_share(model) == 0.0 and planted_accuracy(model) == 0.0


def test_grpo_with_top_k_routing_cannot_find_the_rewarded_experts(tmp_path):
    model = planted_moe_model()
    before = rewarded_logits(model)
    trainer = GRPOTrainer(
        model,
        planted_reward,
        args=GRPOConfig(**config_values(tmp_path, **GRPO_VALUES)),
        train_dataset=planted_dataset(),
        processing_class=build_char_tokenizer(),
    )
    trainer.train()
    assert torch.allclose(rewarded_logits(model), before, atol=1e-6)
    assert rewarded_top_k_share(model) == 0.0 and planted_accuracy(model) == 0.0


def test_det_ft_cannot_find_the_rewarded_experts(tmp_path):
    model = planted_moe_model()
    before = rewarded_logits(model)
    trainer = MoESFTTrainer(
        model,
        args=MoESFTConfig(
            output_dir=str(tmp_path),
            train_routing="topk",
            per_device_train_batch_size=8,
            max_steps=STEPS,
            learning_rate=0.1,
            router_aux_loss_coef=0.0,
            report_to="none",
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=sft_rows_from_answers(planted_dataset()),
        processing_class=build_char_tokenizer(),
    )
    trainer.train()
    assert torch.allclose(rewarded_logits(model), before, atol=1e-6)
    assert rewarded_top_k_share(model) == 0.0 and planted_accuracy(model) == 0.0
