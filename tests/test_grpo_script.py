"""The packaged training script (`trl_moe_grpo/scripts/grpo.py`) and `trl-moe-grpo train`: TRL GRPO recipes run as
they are, rewards by name or dotted path, an evaluation split, datasets without a test split, clear errors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from trl_moe_grpo import MoEGRPOError
from trl_moe_grpo.commands.train import ACCELERATE_CONFIGS, TrainCommand, training_script
from trl_moe_grpo.scripts.grpo import main, make_parser

# A GRPO recipe with TRL's own keys only (ScriptArguments, GRPOConfig, ModelConfig). `think_format_reward`: TRL's
# `accuracy_reward` needs `math_verify`, which the project does not install.
TRL_RECIPE = """\
model_name_or_path: {model}
dataset_name: {dataset}
reward_funcs: [think_format_reward]
output_dir: {output_dir}
max_steps: 2
per_device_train_batch_size: 4
num_generations: 4
max_completion_length: 4
learning_rate: 1.0e-3
logging_steps: 1
save_strategy: "no"
report_to: none
use_cpu: true
bf16: false
disable_tqdm: true
seed: 0
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE and the character tokenizer (with its chat template), saved as a user's model folder."""
    from trl_moe_grpo.testing import build_char_tokenizer, tiny_moe_model

    folder = tmp_path_factory.mktemp("tiny-qwen3-moe")
    tiny_moe_model("qwen3_moe").save_pretrained(folder)
    build_char_tokenizer().save_pretrained(folder)
    return folder


def write_jsonl(path: Path, num_rows: int, offset: int = 0) -> Path:
    """Conversational prompts `a+b=` with their `solution`, as TRL's GRPO datasets have them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(offset, offset + num_rows):
            a, b = i % 10, (3 * i) % 10
            prompt = [{"role": "user", "content": f"{a}+{b}="}]
            f.write(json.dumps({"prompt": prompt, "solution": str(a + b)}) + "\n")
    return path


def write_recipe(tmp_path: Path, model: Path, dataset: Path | str, extra: str = "") -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TRL_RECIPE.format(model=model, dataset=dataset, output_dir=tmp_path / "out") + extra)
    return recipe


def train(*argv: str):
    script_args, training_args, model_args = make_parser().parse_args_and_config(list(argv))
    return main(script_args, training_args, model_args)


def logged(output: str, key: str) -> list[str]:
    return [line for line in output.splitlines() if f"'{key}'" in line]


def test_trl_grpo_recipe_runs_unchanged(tiny_model, tmp_path, capsys):
    """TRL's keys only, a local jsonl file, one of TRL's rewards by name: 2 steps, the model saved, nothing else."""
    from trl.scripts.grpo import make_parser as trl_make_parser

    recipe = write_recipe(tmp_path, tiny_model, write_jsonl(tmp_path / "data.jsonl", 8))
    # It is a TRL recipe: TRL's own GRPO script takes every key.
    *_, trl_unknown_keys, _ = trl_make_parser().parse_args_and_config(
        ["--config", str(recipe)], return_remaining_strings=True, separate_remaining_strings=True
    )
    assert trl_unknown_keys == []

    assert train("--config", str(recipe)) is None  # no report unless asked
    output = capsys.readouterr().out
    assert len(logged(output, "loss")) == 2 and "rewards/think_format_reward/mean" in output
    assert "Training completed" in output
    saved = tmp_path / "out"
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()
    assert not (saved / "run_info.json").exists() and not (saved / "report.json").exists()


def test_dotted_path_reward_and_a_train_only_dataset(tiny_model, tmp_path, monkeypatch, capsys):
    """A reward function of the user's, by dotted path from the working directory (as TRL's script imports it), on a
    dataset folder with no test split: without evaluation or report the test split is never loaded."""
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the working directory on it, as TRL's does
    module = f"my_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(
        "calls = []\n\n"
        "def digit_share(completions, solution, **kwargs):\n"
        "    calls.append(len(completions))\n"
        "    texts = [c[0]['content'] for c in completions]\n"
        "    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]\n"
    )
    monkeypatch.delitem(sys.modules, module, raising=False)
    train_only = tmp_path / "train_only"
    rows = write_jsonl(tmp_path / "rows.jsonl", 8)
    datasets.load_dataset("json", data_files=str(rows)).save_to_disk(train_only)  # a DatasetDict with `train` only

    recipe = write_recipe(tmp_path, tiny_model, train_only)
    train("--config", str(recipe), "--reward_funcs", f"{module}.digit_share")
    assert sys.modules[module].calls == [4, 4]  # 2 steps of 4 completions (1 prompt x 4 generations)
    assert "rewards/digit_share/mean" in capsys.readouterr().out

    # Evaluation or the report would need the split it lacks: an error that names it, before any model loads.
    for flags in (["--eval_strategy", "steps"], ["--report", "true"]):
        with pytest.raises(MoEGRPOError, match="no split 'test'"):
            train("--config", str(recipe), *flags)


MIXTURE = """\
datasets:
  - path: json
    data_files: {rows}
    columns: [prompt, solution]
test_split_size: 0.25
"""


@pytest.mark.parametrize("source", ["folder of data files", "dataset mixture"])
def test_eval_split_drives_evaluation(tiny_model, tmp_path, capsys, source):
    """The test split becomes the trainer's eval dataset: a folder of data files (`train.jsonl`, `test.jsonl`) as
    `datasets.load_dataset` reads it, or a mixture of TRL's `datasets` with a held-out share (`trl.get_dataset`)."""
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", 8)
    write_jsonl(folder / "test.jsonl", 4, offset=100)
    evaluation = "eval_strategy: steps\neval_steps: 2\nper_device_eval_batch_size: 4\n"
    if source == "folder of data files":
        recipe = write_recipe(tmp_path, tiny_model, folder, evaluation)
    else:
        recipe = write_recipe(tmp_path, tiny_model, "null", evaluation + MIXTURE.format(rows=folder / "train.jsonl"))
    train("--config", str(recipe))
    evaluated = logged(capsys.readouterr().out, "eval_loss")
    assert len(evaluated) == 1 and "'eval_reward'" in evaluated[0]


def test_unknown_keys_and_flags_are_errors_that_name_them(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, "data.jsonl", "learning_rat: 1.0e-4\n")
    with pytest.raises(MoEGRPOError, match="recipe key.* learning_rat"):
        make_parser().parse_args_and_config(["--config", str(recipe)])
    recipe = write_recipe(tmp_path, tiny_model, "data.jsonl")
    # No abbreviations on the command line either: `--learning_rat` is not `--learning_rate`.
    with pytest.raises(MoEGRPOError, match="argument.* --learning_rat"):
        make_parser().parse_args_and_config(["--config", str(recipe), "--learning_rat", "1e-4"])


def test_rewards_must_be_known_and_present(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, write_jsonl(tmp_path / "data.jsonl", 8))
    with pytest.raises(MoEGRPOError, match="Unknown reward function 'letter_accuracy'.*think_format_reward"):
        train("--config", str(recipe), "--reward_funcs", "letter_accuracy")
    recipe.write_text(recipe.read_text().replace("reward_funcs: [think_format_reward]\n", ""))
    with pytest.raises(MoEGRPOError, match="No reward"):
        train("--config", str(recipe))


def test_dataset_configuration_names_apply_to_load_dataset_only(tmp_path):
    from trl_moe_grpo.loading import load_dataset_split

    rows = write_jsonl(tmp_path / "rows.jsonl", 4)
    with pytest.raises(MoEGRPOError, match="configuration name"):
        load_dataset_split(str(rows), "train", name="default")
    assert len(load_dataset_split(str(rows), "train")) == 4


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tensorboard's event files under `log_dir` hold: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return found


def test_report_comes_from_the_trainers_evaluations_and_reaches_tensorboard(tiny_model, tmp_path, capsys):
    """`report: true`: `trainer.evaluate()` at the start and at the last step; per-task rewards and the routing
    measures are logged metrics (read back from tensorboard), and report.json holds the same numbers."""
    folder = tmp_path / "data"
    for split, rows, offset in (("train", 8, 0), ("test", 6, 100)):
        path = write_jsonl(folder / f"{split}.jsonl", rows, offset)
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**row, "task": "ab"[i % 2]}) + "\n" for i, row in enumerate(lines)))
    extra = "report: true\nper_device_eval_batch_size: 4\nnum_generations_eval: 2\n"
    recipe = write_recipe(tmp_path, tiny_model, folder, extra)
    report = train("--config", str(recipe), "--report_to", "tensorboard")
    assert "held-out reward" in capsys.readouterr().out

    logged_scalars = scalars(tmp_path / "out" / "runs")  # tensorboard's default folder
    for tag in ("eval/reward", "eval/reward_by_task/a", "eval/reward_by_task/b", "eval/routing/task_jsd",
                "eval/routing/sequence_routing_entropy", "eval/routing/mean_gate_entropy"):  # fmt: skip
        assert [step for step, _ in logged_scalars[tag]] == [0, 2], tag  # before (eval_on_start) and after
    before, after = (dict(zip(["step", "value"], point)) for point in logged_scalars["eval/reward_by_task/a"])
    assert report["held_out_reward"]["before"]["a"] == pytest.approx(before["value"], abs=1e-6)
    assert report["held_out_reward"]["after"]["a"] == pytest.approx(after["value"], abs=1e-6)
    jsd = logged_scalars["eval/routing/task_jsd"][-1][1]
    assert report["routing"]["after"]["task_jsd"] == pytest.approx(jsd, abs=1e-6)
    # 6 held-out prompts x 2 completions, by task: the routing counts cover every evaluated sequence.
    assert report["steps"] == {"before": 0, "after": 2}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["held_out_reward"] == report["held_out_reward"]
    for name in ("reward_curve.png", "expert_utilization.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_report_of_a_run_shorter_than_logging_steps_says_no_step_was_logged(tiny_model, tmp_path, capsys):
    """max_steps < logging_steps logs no training reward: the report says so (and how to fix it) instead of drawing
    empty axes, and still writes every file it promises."""
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", 8)
    write_jsonl(folder / "test.jsonl", 4, offset=100)
    recipe = write_recipe(tmp_path, tiny_model, folder, "report: true\nper_device_eval_batch_size: 4\n")
    report = train("--config", str(recipe), "--max_steps", "1", "--logging_steps", "5")
    note = "no training step was logged (max_steps=1 < logging_steps=5): lower `logging_steps`"
    assert report["rewards"] == [] and report["rewards_note"].startswith(note)
    assert f"training reward: {note}" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rewards_note"] == report["rewards_note"]
    for name in ("reward_curve.png", "expert_utilization.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_4bit_loading_is_rejected_without_cuda(tiny_model, tmp_path):
    """bitsandbytes quantizes on CUDA only: on CPU `load_in_4bit` is an error, not silently ignored."""
    recipe = write_recipe(tmp_path, tiny_model, write_jsonl(tmp_path / "data.jsonl", 8), "load_in_4bit: true\n")
    with pytest.raises(MoEGRPOError, match="`load_in_4bit` quantizes the model with bitsandbytes, which needs a CUDA"):
        train("--config", str(recipe))


# ------------------------------------------------------------------------------------------- trl-moe-grpo train


def test_train_command_takes_every_argument_as_given():
    """Registered like the other commands, `train` hands all its arguments (`-h` and `--config` included) on."""
    parser = argparse.ArgumentParser(prog="trl-moe-grpo")
    TrainCommand().register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", "x.yaml", "--num_processes", "2", "-h"])
    assert args.command == "train" and args.argv == ["--config", "x.yaml", "--num_processes", "2", "-h"]


def test_train_command_splits_launcher_and_script_arguments(tiny_model, tmp_path):
    recipe = str(write_recipe(tmp_path, tiny_model, "data.jsonl"))
    command = TrainCommand()
    argv = ["--config", recipe, "--accelerate_config", "multi_process", "--max_steps", "3", "--num_processes", "2"]
    assert command.launch_arguments(argv) == [
        "--config_file", str(ACCELERATE_CONFIGS / "multi_process.yaml"), "--num_processes", "2",
        str(training_script()), "--config", recipe, "--max_steps", "3",
    ]  # fmt: skip
    # TRL's shipped configs by name too, and paths.
    assert command.launch_arguments(["--config", recipe, "--accelerate_config=zero2"])[1].endswith("zero2.yaml")
    path = str(ACCELERATE_CONFIGS / "deepspeed_zero3_cpu.yaml")
    assert command.launch_arguments(["--config", recipe, "--accelerate_config", path])[:2] == ["--config_file", path]

    with pytest.raises(MoEGRPOError, match="'no_such_config' is neither a file nor a shipped config.*multi_process"):
        command.launch_arguments(["--config", recipe, "--accelerate_config", "no_such_config"])
    with pytest.raises(MoEGRPOError, match="argument.* --learning_rat.*`accelerate launch` option"):
        command.launch_arguments(["--config", recipe, "--learning_rat", "1e-4"])
    Path(recipe).write_text(Path(recipe).read_text() + "num_processes: 2\n")
    with pytest.raises(MoEGRPOError, match="recipe key.* num_processes.*go on the command line"):
        command.launch_arguments(["--config", recipe])


@pytest.mark.parametrize("name", ["deepspeed_zero2_cpu", "deepspeed_zero3_cpu"])
def test_shipped_deepspeed_configs_work_from_any_directory(name, tmp_path, monkeypatch):
    """The CPU DeepSpeed configs name their JSON relative to the repository root; run from elsewhere (or installed
    from a wheel), `--accelerate_config NAME` gives accelerate a config whose JSON path exists."""
    import yaml

    from trl_moe_grpo.commands.train import resolve_accelerate_config

    monkeypatch.chdir(tmp_path)
    resolved = yaml.safe_load(Path(resolve_accelerate_config(name)).read_text())
    json_file = Path(resolved["deepspeed_config"]["deepspeed_config_file"])
    assert json_file.is_absolute() and json_file == ACCELERATE_CONFIGS / f"{name}.json"
    assert json.loads(json_file.read_text())["zero_optimization"]["stage"] == int(name[len("deepspeed_zero")])
    assert resolved["distributed_type"] == "DEEPSPEED" and resolved["num_processes"] == 2


def test_the_wheel_ships_the_accelerate_configs(tmp_path):
    """What `--accelerate_config NAME` resolves is installed with the package, not only present in a checkout."""
    import subprocess
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    build = [sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "--no-build-isolation", "-q", "-w"]
    subprocess.run([*build, str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("trl_moe_grpo-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    shipped = [path.name for path in ACCELERATE_CONFIGS.iterdir() if path.suffix in (".yaml", ".json")]
    assert len(shipped) == 8
    assert {f"trl_moe_grpo/accelerate_configs/{name}" for name in shipped} <= packaged
