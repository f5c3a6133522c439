"""`MoEGRPOTrainer` with `use_vllm=True` (colocate): two training steps, each family and rollout routing; errors."""

from __future__ import annotations

import pytest
import torch
from conftest import save_vllm_tiny_moe
from transformers import AutoModelForCausalLM

from trl_moe_grpo import MoEGRPOConfig, MoEGRPOError, MoEGRPOTrainer
from trl_moe_grpo.demo.digit_sum import digit_sum_dataset
from trl_moe_grpo.testing import build_char_tokenizer, tiny_moe_internvl, tiny_moe_model

# Largest |TRL's replayed log-prob - vLLM's sampling log-prob| over a step's completion tokens. vLLM runs bf16, TRL
# fp32 on the synced weights: bf16 rounding (measured ~0.01). A misaligned trace or a weight sync that did not reach
# vLLM's compute gives gaps of 0.3 to 1 (tests_vllm/test_vllm_replay.py, test_vllm_weight_sync.py).
LOGP_GAP = 0.05


def char_code_reward(completions, **kwargs):
    """A verifiable reward that nearly always differs when two completions differ (an untrained tiny model writes
    no digits, so the task's own reward would be 0 for every rollout and no step would learn)."""
    return [(sum(map(ord, c)) % 7) / 6 for c in completions]


def vllm_config(tmp_path, **overrides) -> MoEGRPOConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=128,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
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
    return MoEGRPOConfig(**values)


@pytest.mark.parametrize(
    "family, routing, replay",
    [
        ("qwen3_moe", "sample", True),
        ("mixtral", "noise", True),
        ("qwen3_moe", "topk", True),
        ("qwen3_moe", "sample", False),
    ],
    ids=lambda v: str(v),
)
def test_trainer_trains_two_steps_with_vllm_rollouts(tmp_path, family, routing, replay):
    path = save_vllm_tiny_moe(str(tmp_path / "model"), family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    trainer = MoEGRPOTrainer(
        model,
        char_code_reward,
        args=vllm_config(tmp_path, rollout_routing=routing, routing_replay=replay),
        train_dataset=digit_sum_dataset(16, seed=0),
        processing_class=build_char_tokenizer(),
    )
    routers = [adapter.router.weight.detach().clone() for adapter in trainer.routing.adapters]
    batches = []
    generate = trainer._generate_and_score_completions

    def keep_batch(inputs):
        output = generate(inputs)
        batches.append(output)
        return output

    trainer._generate_and_score_completions = keep_batch
    trainer.train()

    if routing == "topk":  # evaluation goes through the same vLLM rollouts (top-K, greedy) and replays them
        metrics = trainer.evaluate(digit_sum_dataset(4, seed=1))
        assert metrics["eval_sampling/sampling_logp_difference/max"] < LOGP_GAP
        assert metrics["eval_routing/sequence_routing_entropy"] > 0
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 2
    gaps = [entry["sampling/sampling_logp_difference/max"] for entry in steps]
    print(f"{family} {routing} replay={replay}: max |TRL - vLLM| completion log-prob per step {gaps}")
    if replay:
        # The rollouts' recorded routes are replayed in TRL's old-log-prob forward: its log-probs are vLLM's, at
        # step 2 too (the weights changed at step 1 and were synced into vLLM).
        assert max(gaps) < LOGP_GAP
    else:
        # Sampled routes, live top-K in training: the log-probs of another routing (the "no replay" ablation).
        assert max(gaps) > LOGP_GAP
    assert any(
        (adapter.router.weight - before).abs().max() > 0 for adapter, before in zip(trainer.routing.adapters, routers)
    )
    for batch in batches:
        routes = batch["routed_experts"]
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1).bool()
        assert routes.shape[:2] == ids.shape
        assert (routes[~mask] == -1).all()  # padding carries no route
        assert (routes[:, : batch["prompt_ids"].shape[1]][batch["prompt_mask"].bool()] >= 0).all()
        if routing == "sample" and replay:
            # The G rollouts of a prompt (greedy tokens, same prompt) differ through their sampled routes.
            prompt_routes = routes[:, : batch["prompt_ids"].shape[1]]
            groups = prompt_routes.view(-1, 4, *prompt_routes.shape[1:])
            assert not all(torch.equal(group[0], group[1]) for group in groups)


def test_vision_language_model_with_vllm_is_a_clear_error(tmp_path):
    with pytest.raises(MoEGRPOError, match="text-only MoE models.*use_vllm=False"):
        MoEGRPOTrainer(
            tiny_moe_internvl(), char_code_reward, args=vllm_config(tmp_path), train_dataset=digit_sum_dataset(4)
        )


def test_family_with_another_routing_law_is_refused(tmp_path):
    """DeepSeek-V3's router selects by normalized sigmoid affinities and mixes by scaled sigmoid scores; vLLM's routing
    function draws from the softmax: `use_vllm=True` refuses the family before the engine starts, naming the rule."""
    path = str(tmp_path / "model")
    model = tiny_moe_model("deepseek_v3", seed=0).to(torch.bfloat16)
    model.save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    with pytest.raises(MoEGRPOError, match="DeepseekV3TopkRouter.*sigmoid.*use_vllm=False"):
        MoEGRPOTrainer(
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
            char_code_reward,
            args=vllm_config(tmp_path),
            train_dataset=digit_sum_dataset(4),
            processing_class=build_char_tokenizer(),
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(vllm_mode="server"), "vllm_mode='server'.*not supported.*docs/vllm.md"),
        (dict(vllm_tensor_parallel_size=2), "vllm_tensor_parallel_size=2"),
    ],
)
def test_unsupported_vllm_settings_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(MoEGRPOError, match=message):
        vllm_config(tmp_path, **overrides)
