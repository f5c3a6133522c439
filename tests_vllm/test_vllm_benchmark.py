"""`benchmarks/vllm_rollout.py --smoke`: every way runs, and both engines record a route for every routed token."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vllm_rollout  # noqa: E402


def test_benchmark_smoke_runs_every_way_and_records_every_route():
    result = vllm_rollout.main(["--smoke"])
    args = vllm_rollout.make_parser().parse_args(["--smoke"])
    # The smoke sizes: 2 prompts x 2 rollouts, 8-token prompts, 8 completion tokens (7 fed back), 2 MoE layers.
    sequences, prompt, fed, layers = 2 * 2, 8, 8 - 1, 2
    assert args.smoke
    assert result["recorded_token_layers"] == dict.fromkeys(vllm_rollout.WAYS, sequences * (prompt + fed) * layers)
    assert all(value > 0 for value in result["tokens_per_second"].values())
    assert set(result["ratios"]) == {
        "HF sampled / top-K",
        "vLLM sampled / top-K",
        "vLLM / HF, top-K",
        "vLLM / HF, sampled",
    }
