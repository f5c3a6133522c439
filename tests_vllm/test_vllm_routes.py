"""Routes taken inside vLLM (CPU router hook) against the HF model's router on the same tokens."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM
from vllm import SamplingParams

from trl_moe_grpo.routing import RoutingController
from trl_moe_grpo.vllm_routing.requests import to_trace

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
MARGIN = 0.05  # log-prob gap: bf16 (8-bit mantissa) routing logits of order 1 are exact to ~0.008
PARAMS = SamplingParams(temperature=1.0, max_tokens=8, logprobs=0, ignore_eos=True, seed=0)


def _generate(llm, routing, mode: str):
    routing.mode = mode
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sampling_params=PARAMS, use_tqdm=False)
    rollouts = []
    for output in outputs:
        completion = list(output.outputs[0].token_ids)
        prompt_routes, completion_routes = to_trace(
            routing.book.pop(output.request_id), len(output.prompt_token_ids), len(completion)
        )
        rollouts.append((list(output.prompt_token_ids) + completion, torch.cat([prompt_routes, completion_routes])))
    return rollouts


def _hf_topk(path: str, ids: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """HF router's top-K `[tokens, layers, K]` and its margin: log-prob gap between the K-th and (K+1)-th expert."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    controller = RoutingController(model)
    with controller.capture(selection_probs=True) as recording, torch.no_grad():
        model(torch.tensor([ids]))
    routes = recording.steps[0][0]
    top = recording.selection_probs[0][0].log().topk(routes.shape[-1] + 1, dim=-1).values
    return routes, top[..., -2] - top[..., -1]


def test_topk_routes_equal_hf_router_topk(vllm_engine, moe_path):
    llm, routing = vllm_engine
    matched = total = clear_total = 0
    for ids, trace in _generate(llm, routing, "topk"):
        assert (trace[-1] == -1).all()  # the last completion token is never fed back
        assert (trace[:-1] >= 0).all()
        hf, margin = _hf_topk(moe_path, ids, torch.float32)
        same = (trace[:-1].sort(-1).values == hf[:-1].sort(-1).values.to(trace.dtype)).all(-1)
        # vLLM computes in bf16 with its own CPU kernels: hidden states differ from HF's by bf16 rounding, which can
        # swap two experts whose log-probs are within it. Where the K-th expert leads the next by more, sets match.
        clear = margin[:-1] > MARGIN
        assert same[clear].all(), f"vLLM and HF top-K differ where the margin exceeds {MARGIN}"
        matched += int(same.sum())
        total += same.numel()
        clear_total += int(clear.sum())
    name = os.path.basename(moe_path)
    print(f"{name}: vLLM top-K == HF top-K on {matched}/{total} (token, layer) sets ({clear_total} margin > {MARGIN})")
    assert matched >= 0.9 * total


def test_sampled_routes_differ_from_topk_and_across_rollouts(vllm_engine):
    llm, routing = vllm_engine
    topk = _generate(llm, routing, "topk")
    first, second = _generate(llm, routing, "sample"), _generate(llm, routing, "sample")
    prompt_rows = sum(len(p) for p in PROMPTS)
    sampled_prompts = torch.cat([trace[: len(p)] for (_, trace), p in zip(first, PROMPTS)])
    topk_prompts = torch.cat([trace[: len(p)] for (_, trace), p in zip(topk, PROMPTS)])
    again = torch.cat([trace[: len(p)] for (_, trace), p in zip(second, PROMPTS)])
    assert sampled_prompts.shape[0] == prompt_rows
    assert not torch.equal(sampled_prompts, topk_prompts)
    assert not torch.equal(sampled_prompts, again)
