"""`benchmarks/paper_tables.py --smoke`: every arm of the miniature paper tables trains 2 steps and is reported."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from trl_moe_grpo.demo.visual_mc import HELDOUT_TASKS, TASKS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import paper_tables  # noqa: E402

pytestmark = pytest.mark.slow


def test_every_arm_trains_and_is_reported(tmp_path):
    output = tmp_path / "results.md"
    (tmp_path / "results-findings.md").write_text("A reading of the numbers, by hand.\n")
    command = [sys.executable, "benchmarks/paper_tables.py", "--smoke", "--output", str(output)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    results = json.loads(output.with_suffix(".json").read_text())
    arms = {key.split("/")[0] for key in results["runs"]}
    assert arms == set(paper_tables.ARMS)
    assert {"det_ft", "stoch_ft_multi", "stoch_ft_noise", "grpo_r3", "moe_grpo", "ec", "sinkhorn_lb"} <= arms
    assert {"lever_sampled_tokens", "lever_regenerate", "lever_g16", "lever_warmup"} <= arms
    splits = ["test", "test_shifted", "test_heldout_tasks"]
    assert results["settings"]["test_splits"] == splits
    assert results["settings"]["generalization_splits"] == splits[1:]
    for key, run in [("before", results["base"]), *results["runs"].items()]:
        assert list(run["split_accuracy"]) == splits, key
        assert run["accuracy"] == run["split_accuracy"]["test"], key  # the in-distribution split
        for split, accuracy in run["split_accuracy"].items():
            assert 0.0 <= accuracy["all"] <= 1.0, (key, split)
        assert set(run["split_accuracy"]["test_heldout_tasks"]) == {"all", *HELDOUT_TASKS}, key
        assert set(run["split_accuracy"]["test_shifted"]) == set(run["split_accuracy"]["test"]) == {"all", *TASKS}
        # The headline: the mean of the shifted and held-out-task accuracies, nothing else.
        expected = (
            run["split_accuracy"]["test_shifted"]["all"] + run["split_accuracy"]["test_heldout_tasks"]["all"]
        ) / 2
        assert math.isclose(run["generalization"], expected), key
    # Route sensitivity of the starting model on every split: a share of prompts, and the report says it.
    assert list(results["base"]["route_sensitivity"]) == splits
    for split, measured in results["base"]["route_sensitivity"].items():
        assert 0.0 <= measured["route_sensitivity"] <= measured["completions_not_all_equal"] <= 1.0, split
        assert 0.0 <= measured["rollout_reward"] <= 1.0, split
    for key, run in results["runs"].items():
        summary = run["routing"]
        assert 0 < summary["mean_gate_entropy"] <= math.log(8) and 0 <= summary["task_jsd"] <= math.log(2), key
        if key.split("/")[0] == "moe_grpo_no_lb" and run["groups_with_signal"] == 0:
            # No balance loss and no group whose rollouts disagreed in reward: every advantage is 0, so the routers
            # get no gradient at all and must not move (2 smoke steps can draw no reward spread).
            assert run["router_weight_change"] == 0, key
        else:
            assert run["router_weight_change"] > 0, key  # every other arm trains the routers

    report = output.read_text()
    titles = (
        "Table 1",
        "Table 4",
        "Table 5",
        "Table 7",
        "Levers",
        "Accuracy per task",
        "Routing analysis",
        "Time per arm",
    )
    for title in titles:
        assert f"## {title}" in report
    for split in splits:
        assert f"### {split}\n" in report
    assert (
        "## Findings (written by hand from this run: `results-findings.md`)\n\nA reading of the numbers, by hand.\n"
        in report
    )
    assert "Route sensitivity (the share of prompts whose G=8 sampled-routing greedy rollouts" in report
    # Its row in each of the five comparison tables, the three per-task tables, the analysis and the times.
    assert report.count("| MoE-GRPO |") == 10
    # The tables' columns: the headline, every split side by side, the paired gaps on both scores.
    header = "| method | generalization (mean ± std) | test | test_shifted | test_heldout_tasks | vs MoE-GRPO, "
    assert report.count(header + "generalization (± SE) | vs MoE-GRPO, test (± SE) | paper |") == 5
    moe_grpo = results["runs"]["moe_grpo/0"]
    cells = [f"{moe_grpo['generalization']:.3f} ± n/a"] + [
        f"{moe_grpo['split_accuracy'][s]['all']:.3f}" for s in splits
    ]
    assert f"| MoE-GRPO | {' | '.join(cells)} | — | — |" in report
    for name in ("before", "det_ft", "moe_grpo"):
        for figure in ("expert_utilization_by_task", "routing_probabilities"):
            assert (tmp_path / "results" / f"{name}_{figure}.png").stat().st_size > 0

    # A second run with the same settings resumes: nothing is trained again.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "== det_ft/0" not in again.stdout


def test_arms_runs_a_subset_with_moe_grpo_as_the_reference(tmp_path):
    output = tmp_path / "results.md"
    command = [sys.executable, "benchmarks/paper_tables.py", "--smoke", "--tables", "1", "--arms", "det_ft"]
    result = subprocess.run([*command, "--output", str(output)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    results = json.loads(output.with_suffix(".json").read_text())
    assert set(results["runs"]) == {"det_ft/0", "moe_grpo/0"}
    table = output.read_text().split("## Table 1")[1].split("\n## ")[0]
    rows = [
        line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| method", "| ---"))
    ]
    assert [row.split(" | ")[0] for row in rows] == ["| Det-FT (fine-tuning, top-K)", "| MoE-GRPO"]
