"""`trl-moe-grpo <command>`: every command reports a fixable error the same way, one line and exit code 2."""

from __future__ import annotations

import inspect

import pytest

from trl_moe_grpo.cli import COMMAND_PATHS, build_commands, main, make_parser

TINY_RECIPE = """\
model_name_or_path: some/model
dataset_name: some/dataset
output_dir: {output_dir}
use_cpu: true
bf16: false
report_to: none
"""


def recipe(tmp_path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(TINY_RECIPE.format(output_dir=tmp_path / "out"))
    return str(path)


# One failing invocation per command: (argv builder, a fragment of the fix its message names).
FAILURES = {
    "train": (lambda tmp: ["train", "--config", recipe(tmp), "--learning_rat", "1e-4"], "--learning_rat"),
    "calibrate": (
        lambda tmp: ["calibrate", "m", "--dataset", "d", "--mask-ratio", "1.5", "--output", str(tmp / "s.json")],
        "--mask-ratio must be in [0, 1)",
    ),
    "show-modality-stats": (
        lambda tmp: ["show-modality-stats", str(tmp / "missing.json")],
        "Cannot read modality statistics",
    ),
    "measure-routing": (
        lambda tmp: ["measure-routing", "m", "--dataset", "visual_mc", "--num-samples", "0"],
        "--num-samples and --batch-size must be at least 1",
    ),
    "probe-routing": (
        lambda tmp: ["probe-routing", "m", "--dataset", "d", "--reward", "no_such_reward"],
        "Unknown reward function 'no_such_reward'",
    ),
    "upcycle": (lambda tmp: ["upcycle", "--preset", "nope", "--dry-run"], "internvl3_5-1b"),
    "evaluate-clip": (
        lambda tmp: ["evaluate-clip", "m", "--dataset", "a", "--dataset", "b", "--class-names", "x,y"],
        "`--class-names` applies to one dataset",
    ),
}


def test_every_command_has_an_error_case():
    assert {command.name for command in build_commands()} == set(FAILURES)
    assert len(COMMAND_PATHS) == len(FAILURES)


def test_train_without_a_recipe_says_so(capsys):
    assert main(["train"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("trl-moe-grpo train: error: No recipe: pass `--config recipe.yaml`")


def test_train_with_a_missing_recipe_names_it(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert main(["train", "--config", missing]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"trl-moe-grpo train: error: Recipe {missing!r} not found")


@pytest.mark.parametrize("command", sorted(FAILURES))
def test_errors_are_one_line_with_exit_code_2(command, tmp_path, capsys):
    argv, fragment = FAILURES[command]
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    reported = [line for line in err.splitlines() if line.startswith("trl-moe-grpo ")]
    assert len(reported) == 1, err
    assert reported[0].startswith(f"trl-moe-grpo {command}: error: ") and fragment in reported[0]


def test_show_modality_stats_reads_a_statistics_file(tmp_path, capsys):
    """The happy path still prints (the error handling wraps the command, it does not swallow output)."""
    import torch

    from trl_moe_grpo.guidance import ModalityStatistics

    counts = torch.tensor([[[3, 1, 0, 0], [0, 0, 2, 2]]] * 2)  # [layers, modality, experts]
    model = {"architecture": "X", "num_layers": 2, "num_experts": 4, "top_k": 2, "router_layers": ["a", "b"]}
    path = tmp_path / "stats.json"
    ModalityStatistics(counts=counts, model=model, num_samples=2).save(path, 0.25)
    assert main(["show-modality-stats", str(path)]) == 0
    assert "layer" in capsys.readouterr().out.lower()


@pytest.mark.parametrize(("old", "new"), [("analyze", "show-modality-stats"), ("analyze-routing", "measure-routing")])
def test_old_command_names_still_run_with_a_one_line_deprecation_note(old, new, tmp_path, capsys):
    """The renamed commands keep their old names for one release: same arguments, same run, one note on stderr."""
    import torch

    from trl_moe_grpo.guidance import ModalityStatistics

    if old == "analyze":
        path = tmp_path / "stats.json"
        counts = torch.tensor([[[3, 1, 0, 0], [0, 0, 2, 2]]])
        model = {"architecture": "X", "num_layers": 1, "num_experts": 4, "top_k": 2, "router_layers": ["a"]}
        ModalityStatistics(counts=counts, model=model, num_samples=2).save(path, 0.25)
        argv = [str(path)]
    else:  # fails in the command's own checks, after the note
        argv = ["m", "--dataset", "d", "--num-samples", "0"]
    new_code = main([new, *argv])
    new_out, new_err = capsys.readouterr()
    assert main([old, *argv]) == new_code
    out, err = capsys.readouterr()
    note = f"trl-moe-grpo: `{old}` is deprecated and will be removed in the next release; use `{new}`"
    assert out == new_out and err.startswith(note) and err.splitlines()[1:] == new_err.splitlines()
    assert old not in new_err


def test_the_two_routing_views_say_how_they_differ():
    """`show-modality-stats` reads a file and runs no model; `measure-routing` runs models: each help says so and
    names the other."""
    helps = {command.name: command.help for command in build_commands()}
    assert "no model runs" in helps["show-modality-stats"] and "`measure-routing`" in helps["show-modality-stats"]
    assert (
        helps["measure-routing"].startswith("Run MoE models") and "`show-modality-stats`" in helps["measure-routing"]
    )


def test_max_shard_size_default_is_the_apis():
    from trl_moe_grpo.upcycle import upcycle

    args = make_parser(build_commands()).parse_args(["upcycle", "source", "--output", "out"])
    assert args.max_shard_size == inspect.signature(upcycle).parameters["max_shard_size"].default == "5GB"
