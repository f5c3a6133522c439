"""`MoEVLLMGeneration.rollout(...)`: the routing of vLLM's rollouts is chosen by a context, as on the transformers
path (`RoutingController.rollout`), and the routes generated inside it are in the recording it yields."""

from __future__ import annotations

import pytest
import torch
from conftest import save_vllm_tiny_moe
from test_vllm_trainer import char_code_reward, vllm_config
from transformers import AutoModelForCausalLM

from trl_moe_grpo import MoEGRPOError, MoEGRPOTrainer
from trl_moe_grpo.demo.digit_sum import digit_sum_dataset
from trl_moe_grpo.testing import build_char_tokenizer

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
REPEATED = [prompt for prompt in PROMPTS for _ in range(2)]  # two rollouts per prompt, as TRL hands them


def test_rollout_context_routes_and_records(tmp_path):
    path = save_vllm_tiny_moe(str(tmp_path / "model"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    trainer = MoEGRPOTrainer(
        model,
        char_code_reward,
        args=vllm_config(tmp_path),
        train_dataset=digit_sum_dataset(4, seed=0),
        processing_class=build_char_tokenizer(),
    )
    generation = trainer.vllm_generation
    with pytest.raises(MoEGRPOError, match="outside `rollout\\(\\)`"):
        generation.generate(PROMPTS, None, 1)
    with pytest.raises(MoEGRPOError, match="Unknown rollout routing"):
        with generation.rollout("expert_choice"):
            pass

    def sampled_routes(routing: str) -> list[torch.Tensor]:
        with generation.rollout(routing, greedy=True) as recording:
            assert generation.routing.mode == routing  # the engine's router hook routes as the context says
            with pytest.raises(MoEGRPOError, match="already open"):
                with generation.rollout("topk"):
                    pass
            _, completions, _, _ = generation.generate(REPEATED, None, 2)
        assert generation.routing.mode == "topk"  # closed: the engine routes with top-K again
        lengths = [len(p) for p in REPEATED], [len(c) for c in completions]
        prompt_routes, completion_routes = recording.split(*lengths)
        assert [len(r) for r in prompt_routes] == lengths[0] and [len(r) for r in completion_routes] == lengths[1]
        with pytest.raises(MoEGRPOError, match="lengths"):
            recording.split(lengths[0], [n + 1 for n in lengths[1]])
        return prompt_routes

    topk, sampled = sampled_routes("topk"), sampled_routes("sample")
    # Top-K routes a prompt the same way in both rollouts; sampled routing draws them apart.
    assert torch.equal(topk[0], topk[1]) and torch.equal(topk[2], topk[3])
    assert not (torch.equal(sampled[0], sampled[1]) and torch.equal(sampled[2], sampled[3]))
