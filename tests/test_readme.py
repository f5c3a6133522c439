"""The README's "Your model, your data, your reward" steps run as written: upcycle, calibrate, train.

The commands, the recipe and the reward function are read from the README itself, so the test fails when the README
drifts from what runs. The dense model is a tiny InternVL (Qwen3 language model) saved locally, the data file a
parquet of the demo's visual multiple-choice rows; the training run is shortened to 2 steps on the CPU.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_blocks(heading: str) -> dict[str, list[str]]:
    """The fenced code blocks of one README section, by language."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading) :]
    section = section[: section.index("\n## ", len(heading))]
    blocks: dict[str, list[str]] = {}
    for language, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL):
        blocks.setdefault(language, []).append(body)
    return blocks


def commands(bash: str) -> list[list[str]]:
    """The commands of a bash block: comments dropped, continuation lines joined, `pip install` skipped (the test
    runs in the suite's environment)."""
    joined = bash.replace("\\\n", " ")
    lines = [line.split("#", 1)[0].strip() for line in joined.splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("pip ")]


def test_your_model_your_data_your_reward(tmp_path):
    from datasets import Dataset

    from trl_moe_grpo.demo.visual_mc import visual_mc_rows
    from trl_moe_grpo.testing import build_tiny_internvl_processor, tiny_dense_internvl

    blocks = readme_blocks("## Your model, your data, your reward")
    (bash,), (recipe,), (reward,) = blocks["bash"], blocks["yaml"], blocks["python"]
    dense = tmp_path / "path/to/dense-model"
    tiny_dense_internvl(seed=0).save_pretrained(dense)
    build_tiny_internvl_processor().save_pretrained(dense)
    (tmp_path / "data").mkdir()
    Dataset.from_list(visual_mc_rows(32, seed=0)).to_parquet(tmp_path / "data/train.parquet")
    (tmp_path / "my_recipe.yaml").write_text(recipe)
    (tmp_path / "my_rewards.py").write_text(reward)

    steps = commands(bash)
    assert [step[:2] for step in steps] == [["trl-moe-grpo", "upcycle"], ["trl-moe-grpo", "calibrate"],
                                            ["trl-moe-grpo", "train"]]  # fmt: skip
    cpu_and_short = [
        "--use_cpu", "true", "--bf16", "false", "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--max_completion_length", "4", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    cli = [sys.executable, "-m", "trl_moe_grpo.cli"]
    for step in steps:
        extra = cpu_and_short if step[1] == "train" else ["--num-samples", "16"] if step[1] == "calibrate" else []
        result = subprocess.run(cli + step[1:] + extra, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(step)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    stats = json.loads((tmp_path / "models/my-moe/modality_statistics.json").read_text())
    assert stats["model"]["num_experts"] == 8
    trained = tmp_path / "outputs/my-moe-grpo"
    assert (trained / "model.safetensors").is_file() and (trained / "moe_grpo_routing.json").is_file()
    assert "Modality-aware router guidance from models/my-moe/modality_statistics.json" in result.stderr
