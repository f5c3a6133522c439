"""Fixtures of the vLLM suite (run in `.venv-vllm` only: `bash scripts/vllm_env.sh && .venv-vllm/bin/python -m pytest
-q tests_vllm`). vLLM engines run in this process (TRL's colocate mode); building one takes 2-10 s on 2 CPU cores, so
the engine-level tests share one per module and each trainer test builds its own."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, as TRL's colocate mode

import pytest
import torch

from trl_moe_grpo.testing import build_char_tokenizer, tiny_moe_config, tiny_moe_model

# vLLM's CPU attention needs a head dim of 32, 64, ...; its CPU experts pad the expert width to a multiple of 32, and
# its in-place weight reload (the trainer's weight sync) fails on padded experts, so real models' aligned widths.
VLLM_SIZES = {"qwen3_moe": dict(head_dim=32, moe_intermediate_size=32), "mixtral": dict(head_dim=32)}


def save_vllm_tiny_moe(path: str, family: str = "qwen3_moe", seed: int = 0) -> str:
    """The project's tiny MoE of `family` with vLLM-compatible sizes, saved in bf16 with the character tokenizer.

    Saved in bf16 so vLLM (bf16 on CPU) and the HF reference read the same weights.
    """
    model = tiny_moe_model(family, seed=seed, config=tiny_moe_config(family, **VLLM_SIZES[family])).to(torch.bfloat16)
    model.save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_path(request, tmp_path_factory) -> str:
    """A saved tiny MoE of each family vLLM's router hook is tested on."""
    return save_vllm_tiny_moe(str(tmp_path_factory.mktemp(request.param)), request.param)


@pytest.fixture(scope="module")
def vllm_engine(moe_path):
    """An in-process engine built with the arguments `MoEVLLMGeneration` adds to TRL's, and the router hooks."""
    from vllm import LLM

    from trl_moe_grpo.vllm_routing.engine_hooks import VLLMRouting
    from trl_moe_grpo.vllm_routing.generation import ENGINE_KWARGS

    llm = LLM(
        model=moe_path,
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        seed=0,
        logprobs_mode="processed_logprobs",
        **ENGINE_KWARGS,
    )
    return llm, VLLMRouting(llm, mode="topk")
