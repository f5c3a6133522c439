"""`trl-moe-grpo train`: launch the packaged MoE-GRPO training script through `accelerate launch`, as `trl grpo` does.

    trl-moe-grpo train --config recipes/quickstart.yaml
    trl-moe-grpo train --config my_recipe.yaml --accelerate_config deepspeed_zero2 --num_processes 8

Every argument goes to the training script (`trl_moe_grpo/scripts/grpo.py`: its recipe keys and flags, `--help` lists
them) or to `accelerate launch` (its own flags, e.g. `--num_processes`, `--config_file`, `--main_process_port`).
`--accelerate_config NAME` picks an accelerate config shipped in the package (`trl_moe_grpo/accelerate_configs/`:
`single_process`, `multi_process`, `deepspeed_zero2`, `deepspeed_zero3`, `deepspeed_zero2_cpu`,
`deepspeed_zero3_cpu`), else one of TRL's (`zero2`, `fsdp2`, ...), or a path. A recipe holds training keys only; a
key or flag that neither the script nor `accelerate launch` knows is an error that names it, before anything is
launched.
"""

from __future__ import annotations

import argparse
import importlib.resources
import subprocess
import sys
from pathlib import Path

from .base import Command

# The accelerate configs shipped with the package (package data, so a wheel install has them too).
ACCELERATE_CONFIGS = Path(str(importlib.resources.files("trl_moe_grpo").joinpath("accelerate_configs")))
LAUNCHER_EPILOG = (
    "Launcher options: --accelerate_config NAME_OR_PATH (a config shipped in trl_moe_grpo/accelerate_configs/ or "
    "of TRL, by name, or a file) and any `accelerate launch` flag (--num_processes, --config_file, ...)."
)


class TrainCommand(Command):
    name = "train"
    help = "Train an MoE model with MoE-GRPO from a TRL-style recipe (--config recipe.yaml) through accelerate launch."

    def register(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        # Every argument is the script's or the launcher's, and they parse them (`--help` shows the script's): with no
        # prefix characters this parser takes them all, as they are, including `-h` and `--config`.
        parser = subparsers.add_parser(
            self.name, help=self.help, description=self.help, add_help=False, prefix_chars="\0"
        )
        parser.add_argument("argv", nargs=argparse.REMAINDER, help="training script and `accelerate launch` flags")
        return parser

    def run(self, args: argparse.Namespace) -> int:
        from accelerate.commands.launch import launch_command, launch_command_parser
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        launch_argv = self.launch_arguments(args.argv)  # a `MoEGRPOError` here is reported by `cli.main`
        try:
            launch_command(launch_command_parser().parse_args(launch_argv))
        except subprocess.CalledProcessError as error:  # a failed run, from the single-process launcher
            return error.returncode
        except ChildFailedError as error:  # from the multi-process launchers; the ranks printed their own errors
            print(error, file=sys.stderr)
            return 1
        return 0

    def launch_arguments(self, argv: list[str]) -> list[str]:
        """The `accelerate launch` argument list for `argv`: launcher flags, the script, then the script's arguments.

        The recipe and flags are parsed here first (as `trl grpo` does), so a bad value or an unknown key fails before
        any process starts.
        """
        from ..errors import MoEGRPOError
        from ..scripts.grpo import check_no_unknown_arguments, make_parser

        parser = make_parser(prog=f"trl-moe-grpo {self.name}", epilog=LAUNCHER_EPILOG)
        try:
            *_, from_recipe, from_command_line = parser.parse_args_and_config(
                argv, return_remaining_strings=True, separate_remaining_strings=True
            )
        except ValueError as error:  # a value TRL or transformers refuse while parsing: their message names the fix
            if not argv:  # the defaults alone fail on what they lack (e.g. `use_cpu` here): not the user's problem
                raise MoEGRPOError("No recipe: pass `--config recipe.yaml` (or the flags).") from error
            raise MoEGRPOError(str(error)) from error
        launcher_options = accelerate_launch_options()
        flags = [item for item in from_command_line if item.startswith("-")]
        unknown = [flag for flag in flags if flag.split("=")[0] not in launcher_options]
        if from_recipe or unknown:
            hint = "; `accelerate launch` options go on the command line, not in the recipe" if from_recipe else ""
            check_no_unknown_arguments(from_recipe, unknown, launcher=f" or an `accelerate launch` option{hint}")
        launch_args = resolve_accelerate_config_argument(from_command_line)
        script_args = _subtract_subsequence(argv, from_command_line)
        return [*launch_args, str(training_script()), *script_args]


def training_script() -> Path:
    return Path(str(importlib.resources.files("trl_moe_grpo.scripts").joinpath("grpo.py")))


def accelerate_launch_options() -> set[str]:
    """The flags `accelerate launch` takes (both spellings), plus `--accelerate_config`."""
    from accelerate.commands.launch import launch_command_parser

    options = {option for action in launch_command_parser()._actions for option in action.option_strings}
    return options | {"--accelerate_config", "--accelerate-config"}


def shipped_accelerate_configs() -> dict[str, Path]:
    """Accelerate configs by name: the package's (`trl_moe_grpo/accelerate_configs/`), then TRL's for other names."""
    configs = {}
    trl_configs = Path(str(importlib.resources.files("trl").joinpath("accelerate_configs")))
    for folder in (trl_configs, ACCELERATE_CONFIGS):  # ours win a name both have
        if folder.is_dir():
            configs.update({path.stem: path for path in sorted(folder.glob("*.yaml"))})
    return configs


def resolve_accelerate_config(name_or_path: str) -> str:
    """A config file's path from `--accelerate_config`: a file, or a shipped config's name (`.yaml` optional)."""
    from ..errors import MoEGRPOError

    if Path(name_or_path).is_file():
        return name_or_path
    configs = shipped_accelerate_configs()
    name = name_or_path.removesuffix(".yaml")
    if name not in configs:
        raise MoEGRPOError(
            f"Accelerate config {name_or_path!r} is neither a file nor a shipped config; shipped: {sorted(configs)}."
        )
    return str(with_reachable_deepspeed_file(configs[name]))


def with_reachable_deepspeed_file(config: Path) -> Path:
    """`config`, or a temporary copy of it whose DeepSpeed JSON is named by absolute path.

    The CPU DeepSpeed configs name their JSON relative to the repository root, for `accelerate launch --config_file`
    from a checkout; accelerate opens that path from the working directory. From anywhere else (or from a wheel),
    the copy points at the JSON shipped beside the config.
    """
    import tempfile

    import yaml

    values = yaml.safe_load(config.read_text()) or {}
    deepspeed = values.get("deepspeed_config") or {}
    json_file = deepspeed.get("deepspeed_config_file")
    if not json_file or Path(json_file).is_file():
        return config
    deepspeed["deepspeed_config_file"] = str(config.parent / Path(json_file).name)
    copy = Path(tempfile.mkdtemp(prefix="trl-moe-grpo-")) / config.name
    copy.write_text(yaml.safe_dump(values))
    return copy


def resolve_accelerate_config_argument(launch_args: list[str]) -> list[str]:
    """`launch_args` with `--accelerate_config X` replaced by `--config_file <path>` (first), as TRL's CLI does."""
    from ..errors import MoEGRPOError

    rest, config_file = [], None
    items = iter(launch_args)
    for item in items:
        flag, has_value, value = item.partition("=")
        if flag not in ("--accelerate_config", "--accelerate-config"):
            rest.append(item)
            continue
        if not has_value:
            value = next(items, None)
            if value is None:
                raise MoEGRPOError("`--accelerate_config` needs a value: a shipped config's name or a file.")
        config_file = resolve_accelerate_config(value)
    return (["--config_file", config_file] if config_file is not None else []) + rest


def _subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` without the ordered `subsequence` (the launcher's arguments among the script's)."""
    remaining = iter(subsequence)
    current = next(remaining, None)
    result = []
    for item in items:
        if current is not None and item == current:
            current = next(remaining, None)
        else:
            result.append(item)
    return result
