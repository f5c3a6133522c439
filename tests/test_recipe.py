"""The quickstart recipe end to end (fewer steps), and recipe parsing."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import train  # noqa: E402  (recipes/train.py)

from trl_moe_grpo import MoEGRPOError  # noqa: E402


def test_quickstart_recipe_runs_and_reports(tmp_path):
    """`accelerate launch recipes/train.py --config recipes/quickstart.yaml`, shortened: the report holds numbers."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "recipes/train.py",
        "--config", "recipes/quickstart.yaml", "--output_dir", str(tmp_path), "--max_steps", "2",
        "--num_test_examples", "16", "--modality_calibration_samples", "16", "--logging_steps", "1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for when in ("before", "after"):
        accuracy = report["held_out_accuracy"][when]
        assert set(accuracy) == {"all", "colour", "shape", "count", "position"}
        assert all(0.0 <= value <= 1.0 for value in accuracy.values())
        assert math.isfinite(report["routing_entropy"][when]) and report["routing_entropy"][when] > 0
    assert [r["step"] for r in report["rewards"]] == [1, 2]
    for name in ("reward_curve.png", "expert_utilization.png", "modality_statistics.json", "run_info.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "held-out accuracy" in result.stdout


def test_unknown_recipe_key_is_an_error(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((REPO / "recipes/quickstart.yaml").read_text() + "\nlearning_rat: 1.0e-4\n")
    with pytest.raises(MoEGRPOError, match="learning_rat"):
        train.parse(["--config", str(recipe)])


def test_both_recipes_parse():
    quickstart = train.parse(["--config", str(REPO / "recipes/quickstart.yaml")])[1]
    # The paper's recipe is for GPUs (bf16); here only its values are checked, on CPU in fp32.
    cpu = ["--use_cpu", "true", "--bf16", "false"]
    paper = train.parse(["--config", str(REPO / "recipes/internvl3_5_1b_moe_grpo.yaml"), *cpu])[1]
    for config in (quickstart, paper):
        assert config.num_generations == 8 and config.modality_mask_ratio == 0.25 and config.beta == 0.0
    assert paper.learning_rate == 1e-6 and paper.lr_scheduler_type == "cosine" and paper.max_steps == 25000
    assert paper.per_device_train_batch_size == 4
