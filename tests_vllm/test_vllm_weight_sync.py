"""The trainer's weight sync reaches vLLM's compute: after the HF weights change, vLLM's log-probs follow them."""

from __future__ import annotations

import torch
from conftest import save_vllm_tiny_moe
from test_vllm_replay import TOLERANCE, _hf_completion_logps
from test_vllm_trainer import char_code_reward, vllm_config
from transformers import AutoModelForCausalLM

from trl_moe_grpo import MoEGRPOTrainer
from trl_moe_grpo.demo.digit_sum import digit_sum_dataset
from trl_moe_grpo.testing import build_char_tokenizer

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]


def _largest_gap(trainer, model) -> float:
    """Max |HF (replaying vLLM's routes) - vLLM| completion log-prob over PROMPTS, vLLM routing with top-K."""
    generation = trainer.vllm_generation
    with generation.rollout("topk", greedy=True) as recording:
        _, completions, logprobs, _ = generation.generate(PROMPTS, None, 1)
    gaps = []
    for prompt, completion, logps, (prompt_routes, completion_routes) in zip(
        PROMPTS, completions, logprobs, recording.routes, strict=True
    ):
        routes = torch.cat([prompt_routes, completion_routes])
        hf = _hf_completion_logps(model, prompt + list(completion), len(prompt), routes)
        gaps.append((hf - torch.tensor([lp[0] for lp in logps])).abs().max().item())
    return max(gaps)


def test_sync_weights_reaches_vllm(tmp_path):
    path = save_vllm_tiny_moe(str(tmp_path / "model"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    trainer = MoEGRPOTrainer(
        model,
        char_code_reward,
        args=vllm_config(tmp_path),
        train_dataset=digit_sum_dataset(4, seed=0),
        processing_class=build_char_tokenizer(),
    )
    model.eval()
    assert _largest_gap(trainer, model) < TOLERANCE
    torch.manual_seed(0)
    with torch.no_grad():  # every weight moves: attention, routers, experts (fused in HF, one tensor each in vLLM)
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    stale = _largest_gap(trainer, model)
    trainer.vllm_generation.sync_weights()
    synced = _largest_gap(trainer, model)
    print(f"max |HF - vLLM| log-prob after the HF weights changed: before sync {stale:.4f}, after {synced:.4f}")
    assert stale > TOLERANCE
    assert synced < TOLERANCE


def test_sync_weights_reaches_vllm_with_a_lora_adapter(tmp_path):
    """Under PEFT, TRL merges the adapter (attention LoRA, and the routers' LoRA the trainer adds) before the sync."""
    from peft import LoraConfig

    path = save_vllm_tiny_moe(str(tmp_path / "model"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    trainer = MoEGRPOTrainer(
        model,
        char_code_reward,
        args=vllm_config(tmp_path),
        train_dataset=digit_sum_dataset(4, seed=0),
        processing_class=build_char_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    policy = trainer.model
    policy.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: give every adapter weight values, so the merged model differs
        for name, param in policy.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn_like(param))
    stale = _largest_gap(trainer, policy)
    trainer.vllm_generation.sync_weights()
    synced = _largest_gap(trainer, policy)
    print(f"LoRA: max |HF - vLLM| log-prob after the adapter changed: before sync {stale:.4f}, after {synced:.4f}")
    assert stale > TOLERANCE
    assert synced < TOLERANCE
