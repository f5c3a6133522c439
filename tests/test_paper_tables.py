"""`benchmarks/paper_tables.py --smoke`: every arm of the miniature paper tables trains 2 steps and is reported."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_every_arm_trains_and_is_reported(tmp_path):
    output = tmp_path / "results.md"
    command = [sys.executable, "benchmarks/paper_tables.py", "--smoke", "--output", str(output)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    results = json.loads(output.with_suffix(".json").read_text())
    arms = {key.split("/")[0] for key in results["runs"]}
    assert len(arms) == 14 and {"det_ft", "stoch_ft_multi", "grpo_r3", "moe_grpo", "ec", "sinkhorn_lb"} <= arms
    for key, run in results["runs"].items():
        assert 0.0 <= run["accuracy"]["all"] <= 1.0, key
        summary = run["routing"]
        assert 0 < summary["mean_gate_entropy"] <= math.log(8) and 0 <= summary["task_jsd"] <= math.log(2), key
        if key.split("/")[0] == "moe_grpo_no_lb" and run["groups_with_signal"] == 0:
            # No balance loss and no group whose rollouts disagreed in reward: every advantage is 0, so the routers
            # get no gradient at all and must not move (2 smoke steps can draw no reward spread).
            assert run["router_weight_change"] == 0, key
        else:
            assert run["router_weight_change"] > 0, key  # every other arm trains the routers

    report = output.read_text()
    for title in ("Table 1", "Table 4", "Table 5", "Table 7", "Routing analysis", "Time per arm"):
        assert f"## {title}" in report
    assert report.count("| MoE-GRPO |") == 6  # its row in each of the four tables, the analysis and the times
    for name in ("before", "det_ft", "moe_grpo"):
        for figure in ("expert_utilization_by_task", "routing_probabilities"):
            assert (tmp_path / "results" / f"{name}_{figure}.png").stat().st_size > 0

    # A second run with the same settings resumes: nothing is trained again.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "== det_ft/0" not in again.stdout
