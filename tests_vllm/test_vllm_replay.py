"""Replaying vLLM-recorded sampled routes in the HF forward reproduces vLLM's token log-probs; live top-K does not."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM
from vllm import SamplingParams

from trl_moe_grpo.routing import RoutingController
from trl_moe_grpo.vllm_routing.requests import to_trace

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
# vLLM runs bf16 and HF fp32 on the same bf16 weights: log-probs agree to bf16's rounding through 2 layers.
TOLERANCE = 0.05


def _hf_completion_logps(model, ids: list[int], prompt_length: int, routes: torch.Tensor | None) -> torch.Tensor:
    controller = RoutingController(model)
    try:
        if routes is not None:
            controller.start_replay(routes[None], dispatch=True)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        if routes is not None:
            controller.finish_replay()
    finally:
        controller.remove()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logps[prompt_length - 1 :]


def test_replayed_routes_reproduce_vllm_logps(vllm_engine, moe_path):
    llm, routing = vllm_engine
    routing.mode = "sample"
    params = SamplingParams(temperature=1.0, max_tokens=8, logprobs=0, ignore_eos=True, seed=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sampling_params=params, use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(moe_path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    replay_errors, live_errors = [], []
    for output in outputs:
        completion = output.outputs[0]
        ids = list(output.prompt_token_ids) + list(completion.token_ids)
        prompt_routes, completion_routes = to_trace(
            routing.book.pop(output.request_id), len(output.prompt_token_ids), len(completion.token_ids)
        )
        vllm_logps = torch.tensor([next(iter(step.values())).logprob for step in completion.logprobs])
        routes = torch.cat([prompt_routes, completion_routes])
        replayed = _hf_completion_logps(model, ids, len(output.prompt_token_ids), routes)
        live = _hf_completion_logps(model, ids, len(output.prompt_token_ids), None)
        replay_errors.append((replayed - vllm_logps).abs().max())
        live_errors.append((live - vllm_logps).abs().max())
    replay_error, live_error = max(replay_errors), max(live_errors)
    name = os.path.basename(moe_path)
    print(f"{name}: max |HF - vLLM| completion log-prob: replayed routes {replay_error:.4f}, live {live_error:.4f}")
    assert replay_error < TOLERANCE
    assert live_error > TOLERANCE
