"""The quickstart recipe end to end (fewer steps), and recipe parsing."""

import importlib.metadata
import json
import math
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

from trl_moe_grpo import MoEGRPOError
from trl_moe_grpo.demo.visual_mc import TASKS
from trl_moe_grpo.scripts.grpo import make_parser

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str]):
    return make_parser().parse_args_and_config(argv)


def python_without(distribution: str, root: Path) -> str:
    """A virtualenv's Python that has every package this one has except `distribution` (neither its modules nor its
    metadata): what a new user has who installed the package without that extra."""
    venv.create(root, symlinks=True)
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(root)}))
    try:
        hidden = {Path(str(file)).parts[0] for file in importlib.metadata.distribution(distribution).files or ()}
    except importlib.metadata.PackageNotFoundError:
        hidden = set()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if entry.name not in hidden and not (site_packages / entry.name).exists():
            (site_packages / entry.name).symlink_to(entry)
    return str(root / "bin" / "python")


def test_quickstart_recipe_runs_and_reports_without_deepspeed(tmp_path, visual_mc_folder):
    """`accelerate launch recipes/train.py --config recipes/quickstart.yaml`, shortened, run from the repository root
    as the quickstart runs it, in an environment without DeepSpeed (the quickstart does not install it): training
    starts and the report holds numbers."""
    python = python_without("deepspeed", tmp_path / "venv")
    probe = "from accelerate.utils import is_deepspeed_available; print(bool(is_deepspeed_available()))"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"
    command = [
        python, "-m", "accelerate.commands.launch", "--num_processes", "1", "recipes/train.py",
        "--config", "recipes/quickstart.yaml", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--dataset_name", str(visual_mc_folder), "--modality_calibration_samples", "16", "--logging_steps", "1",
        "--write_run_info", "true",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    output_dir = tmp_path / "out"
    report = json.loads((output_dir / "report.json").read_text())
    for when in ("before", "after"):
        accuracy = report["held_out_reward"][when]
        assert set(accuracy) == {"all", *TASKS}
        assert all(0.0 <= value <= 1.0 for value in accuracy.values())
        assert all(math.isfinite(v) and v > 0 for v in report["routing"][when].values())
    assert [r["step"] for r in report["rewards"]] == [1, 2]
    for name in ("reward_curve.png", "expert_utilization.png", "modality_statistics.json", "run_info.json"):
        assert (output_dir / name).stat().st_size > 0
    assert "held-out reward" in result.stdout


def test_unknown_recipe_key_is_an_error(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((REPO / "recipes/quickstart.yaml").read_text() + "\nlearning_rat: 1.0e-4\n")
    with pytest.raises(MoEGRPOError, match="learning_rat"):
        parse(["--config", str(recipe)])


def test_both_recipes_parse():
    quickstart_script, quickstart, _ = parse(["--config", str(REPO / "recipes/quickstart.yaml")])
    # The paper's recipe is for GPUs (bf16); here only its values are checked, on CPU in fp32.
    cpu = ["--use_cpu", "true", "--bf16", "false"]
    paper_script, paper, _ = parse(["--config", str(REPO / "recipes/internvl3_5_1b_moe_grpo.yaml"), *cpu])
    for config in (quickstart, paper):
        assert config.num_generations == 8 and config.modality_mask_ratio == 0.25 and config.beta == 0.0
    assert paper.learning_rate == 1e-6 and paper.lr_scheduler_type == "cosine" and paper.max_steps == 25000
    assert paper.per_device_train_batch_size == 4
    # Both name their reward; only the quickstart reports before/after.
    reward = "trl_moe_grpo.demo.visual_mc.accuracy_reward"
    assert quickstart_script.reward_funcs == paper_script.reward_funcs == [reward]
    assert quickstart_script.report and not paper_script.report
