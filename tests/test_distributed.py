"""Two processes under `accelerate launch`: `recipes/train.py` with DDP and with DeepSpeed ZeRO-2 and ZeRO-3, on CPU.

Each test launches the quickstart recipe on 2 gloo ranks for 2 steps, on a tiny InternVL-MoE saved to a temp folder,
and asserts what actually ran from the recipe's `run_info.json`: on CPU, accelerate can silently start one process or
leave DeepSpeed off (README, "Recipes, multi-process and DeepSpeed"), so a finished run proves nothing.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.utils import is_deepspeed_available

from trl_moe_grpo.demo.visual_mc import TASKS

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 300  # seconds; a launch takes ~15-25 s on 2 cores
TAIL = 6000  # characters of output shown when a launch fails

pytestmark = pytest.mark.slow
needs_deepspeed = pytest.mark.skipif(
    not is_deepspeed_available(), reason="deepspeed is not installed (`pip install -e '.[dev]'`)"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny InternVL-MoE and its processor, saved, plus the modality statistics the recipe would calibrate."""
    from trl_moe_grpo.demo.visual_mc import visual_mc_dataset
    from trl_moe_grpo.guidance import calibrate
    from trl_moe_grpo.routing import RoutingController
    from trl_moe_grpo.routing.introspection import vision_token_ids
    from trl_moe_grpo.testing import build_tiny_internvl_processor, tiny_moe_internvl

    folder = tmp_path_factory.mktemp("tiny-internvl-moe")
    model, processor = tiny_moe_internvl(seed=0), build_tiny_internvl_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    # The same 16 training prompts and batch size the recipe's own calibration pass uses (see `launch`).
    processor.tokenizer.padding_side = "left"
    rows = [row for _, row in zip(range(16), visual_mc_dataset(64, 16, seed=0)["train"])]
    controller = RoutingController(model, vision_token_ids=vision_token_ids(model))
    calibrate(model, controller, processor, rows, batch_size=8).save(folder / "modality_statistics.json", 0.25)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchFailed(AssertionError):
    def __init__(self, returncode: int, output: str):
        super().__init__(f"`accelerate launch` exited with {returncode}:\n{output[-TAIL:]}")
        self.output = output


def launch(accelerate_config: str, model: Path, data: Path, output_dir: Path, *flags: str) -> str:
    """Run the quickstart recipe on 2 processes; return its output, or fail with the output's tail."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", f"trl_moe_grpo/accelerate_configs/{accelerate_config}",
        "--main_process_port", str(free_port()),
        "recipes/train.py", "--config", "recipes/quickstart.yaml",
        "--model_name_or_path", str(model), "--output_dir", str(output_dir),
        "--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true",
        "--dataset_name", str(data), "--modality_calibration_samples", "16",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--write_run_info", "true",
        *flags,
    ]  # fmt: skip
    # No GPU even where there is one: these are the CPU (gloo) set-ups. No hub: everything is local.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks
        output, _ = process.communicate()
        pytest.fail(f"`accelerate launch` ran past {LAUNCH_TIMEOUT} s (a hung collective?):\n{output[-TAIL:]}")
    if process.returncode != 0:
        raise LaunchFailed(process.returncode, output)
    return output


def run_info(output_dir: Path, output: str) -> dict:
    path = output_dir / "run_info.json"
    assert path.is_file(), f"recipes/train.py wrote no run_info.json:\n{output[-TAIL:]}"
    return json.loads(path.read_text())


def step_losses(output: str) -> list[float]:
    """The `loss` of every logged training step, from the log dicts the main process prints.

    Matched as dicts, not lines: the other rank's output can land on the same line (each dict is one write, so it is
    never split itself).
    """
    return [float(ast.literal_eval(match)["loss"]) for match in re.findall(r"\{'loss': [^{}]*\}", output)]


def assert_trained(output: str, steps: int = 2) -> None:
    losses = step_losses(output)
    assert len(losses) == steps, f"expected {steps} logged losses, got {losses}:\n{output[-TAIL:]}"
    assert all(math.isfinite(loss) for loss in losses), losses


def assert_two_ranks(info: dict, distributed_type: str, wrapper: str, zero_stage: int | None) -> None:
    assert info["world_size"] == 2, info
    assert info["backend"] == "gloo" and info["device"].startswith("cpu"), info
    assert info["distributed_type"] == distributed_type, info
    assert info["model_wrapped"] == wrapper, info
    assert info["zero_stage"] == zero_stage, info


def test_ddp_two_processes(tiny_model, visual_mc_folder, tmp_path):
    output = launch("multi_process.yaml", tiny_model, visual_mc_folder, tmp_path)
    assert_two_ranks(run_info(tmp_path, output), "MULTI_CPU", "DistributedDataParallel", None)
    assert_trained(output)
    report = json.loads((tmp_path / "report.json").read_text())
    for when in ("before", "after"):
        accuracy = report["held_out_reward"][when]
        assert set(accuracy) == {"all", *TASKS}, accuracy
        assert all(0.0 <= value <= 1.0 for value in accuracy.values()), accuracy
        assert all(math.isfinite(v) and v > 0 for v in report["routing"][when].values()), report
    assert [r["step"] for r in report["rewards"]] == [1, 2], report["rewards"]


@needs_deepspeed
def test_deepspeed_zero2_two_processes(tiny_model, visual_mc_folder, tmp_path):
    # DeepSpeed from the accelerate config alone (its `deepspeed_config_file`), no `--deepspeed` training argument.
    output = launch("deepspeed_zero2_cpu.yaml", tiny_model, visual_mc_folder, tmp_path, "--report", "false")
    assert_two_ranks(run_info(tmp_path, output), "DEEPSPEED", "DeepSpeedEngine", 2)
    assert_trained(output)


@needs_deepspeed
def test_deepspeed_zero3_two_processes(tiny_model, visual_mc_folder, tmp_path):
    # The `--deepspeed` training-argument path (DeepSpeed's communication started before the partitioned load, by
    # recipes/train.py), with the report: its before/after measurements run on every rank, on the same rows. The
    # trainer calibrates its modality masks on parameters ZeRO-3 partitioned at load, gathering them for that pass.
    deepspeed_json = "trl_moe_grpo/accelerate_configs/deepspeed_zero3_cpu.json"
    output = launch("deepspeed_zero3_cpu.yaml", tiny_model, visual_mc_folder, tmp_path, "--deepspeed", deepspeed_json)
    assert_two_ranks(run_info(tmp_path, output), "DEEPSPEED", "DeepSpeedEngine", 3)
    assert_trained(output)
    calibrated = json.loads((tmp_path / "modality_statistics.json").read_text())
    single_process = json.loads((tiny_model / "modality_statistics.json").read_text())
    assert calibrated["layers"] == single_process["layers"]  # the same counts and masks as one process measures
    report = json.loads((tmp_path / "report.json").read_text())
    assert math.isfinite(report["routing"]["after"]["mean_gate_entropy"]), report
    # The ZeRO-3 save gathers the partitioned weights; the folder must load back whole.
    from transformers import AutoModelForImageTextToText

    _, loading = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(loading.values()), loading


def test_ddp_reward_signal_levers_with_groups_split_over_the_ranks(tiny_model, visual_mc_folder, tmp_path):
    """The levers of `docs/design.md` §8 on 2 ranks with 4 rows each, so each group of 8 rollouts is split over both
    ranks: the reward spread comes from the rewards gathered over both, each rank slices its own rows, and every rank
    makes the same number of regeneration attempts (a rank making one more would hang in the rewards' gather)."""
    levers = [
        "--per_device_train_batch_size", "4", "--zero_spread_groups", "exclude_from_normalizer",
        "--regenerate_zero_spread_groups", "2", "--rollout_routing_temperature", "2.0",
        "--router_entropy_coef", "0.01", "--router_warmup_steps", "1",
    ]  # fmt: skip
    output = launch("multi_process.yaml", tiny_model, visual_mc_folder, tmp_path, "--report", "false", *levers)
    assert_two_ranks(run_info(tmp_path, output), "MULTI_CPU", "DistributedDataParallel", None)
    assert_trained(output)
    logs = [ast.literal_eval(match) for match in re.findall(r"\{'loss': [^{}]*\}", output)]
    for log in logs:
        assert 0.0 <= float(log["routing/reward_spread_share"]) <= 1.0, log
        assert float(log["routing/regeneration_attempts"]) in (0.0, 1.0, 2.0), log
        assert math.isfinite(float(log["gate/entropy"])), log
