"""`benchmarks/step_time.py --smoke` and `benchmarks/rollout_throughput.py --smoke`: every arm runs, the token counts
are equal, and the ratios are finite. (Timings themselves are never asserted: they belong to the benchmarks.)"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(script: str, tmp_path: Path, *flags: str) -> dict:
    output = tmp_path / "result.json"
    command = [sys.executable, f"benchmarks/{script}", "--smoke", "--json", str(output), *flags]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| ---" in result.stdout  # the table is printed
    return json.loads(output.read_text())


def test_step_time_runs_every_arm_on_equal_tokens(tmp_path):
    result = run("step_time.py", tmp_path, "--memory")
    arms = result["arms"]
    assert list(arms) == ["trl.GRPOTrainer", "R3 (top-K rollouts, replay)", "MoE-GRPO (sampled, replay, Gate-GRPO)"]
    assert arms["trl.GRPOTrainer"]["ratios"] == [1.0, 1.0]
    for name, arm in arms.items():
        assert len(arm["ratios"]) == 2 and all(math.isfinite(r) and r > 0 for r in arm["ratios"]), name
        assert arm["phases"]["generate"] > 0 and arm["phases"]["forward"] > 0, name
    # The MoE arms build traces and compute routing losses; TRL's does neither.
    assert arms["trl.GRPOTrainer"]["phases"]["trace"] == 0 == arms["trl.GRPOTrainer"]["phases"]["routing_loss"]
    assert arms["MoE-GRPO (sampled, replay, Gate-GRPO)"]["phases"]["routing_loss"] > 0
    # Smoke size: 2 layers, top-2, int16 ids.
    assert result["trace_bytes_per_token"] == [result["trace_bytes_target"]] == [8]
    assert result["tokens_per_step"] == 8
    # --memory: every arm measured in its own process, its peak taken over its steps only (reset after warm-up).
    assert list(result["memory"]) == list(arms)
    for name, memory in result["memory"].items():
        assert 0 < memory["before_mb"] <= memory["peak_mb"], name
        assert memory["step_mb"] == memory["peak_mb"] - memory["before_mb"], name
        # The kernel's resident-size counters lag by up to 64 pages per thread: allow 1 MiB at this tiny size.
        assert -1 <= memory["training_step_mb"] <= memory["step_mb"] + 1, name


def test_rollout_throughput_compares_sampled_with_top_k(tmp_path):
    result = run("rollout_throughput.py", tmp_path)
    assert set(result["tokens_per_second"]) == {"stock", "top-K recorded", "sampled"}
    assert all(value > 0 for value in result["tokens_per_second"].values())
    assert result["ratio_to_topk"]["top-K recorded"] == [1.0, 1.0]
    assert all(math.isfinite(r) for values in result["ratio_to_topk"].values() for r in values)
    # Experts used per layer and decode step (smoke: 2 sequences x top-2 of 4 experts): between K and min(N, B K).
    assert set(result["distinct_experts_per_decode_step"]) == {"top-K recorded", "sampled"}
    assert all(2 <= value <= 4 for value in result["distinct_experts_per_decode_step"].values())
