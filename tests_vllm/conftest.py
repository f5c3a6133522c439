"""Fixtures of the vLLM suite (run in `.venv-vllm` only: `bash scripts/vllm_env.sh && .venv-vllm/bin/python -m pytest
-q tests_vllm`). One in-process vLLM engine per module: building one takes ~10 s on 2 CPU cores."""

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


@pytest.fixture(scope="module")
def qwen3_moe_path(tmp_path_factory) -> str:
    return save_vllm_tiny_moe(str(tmp_path_factory.mktemp("qwen3_moe")))


@pytest.fixture(scope="module")
def vllm_engine(qwen3_moe_path):
    from vllm import LLM

    from trl_moe_grpo.vllm_routing.engine_hooks import VLLMRouting

    llm = LLM(
        model=qwen3_moe_path,
        dtype="bfloat16",
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        seed=0,
        logprobs_mode="processed_logprobs",
    )
    return llm, VLLMRouting(llm, mode="topk")
