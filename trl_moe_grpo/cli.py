"""`trl-moe-grpo <command>`: the side jobs of MoE-GRPO.

Modelled on TRL's CLI (`trl/cli/commands/base.py`): each command is a small class in `trl_moe_grpo/commands/` with
`register` (its arguments) and `run` (returns an exit code); heavy imports happen inside `run`, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import sys

from .commands.base import Command

# The commands, in the order `--help` lists them. Each module is light to import.
COMMAND_PATHS: list[tuple[str, str]] = [
    ("trl_moe_grpo.commands.train", "TrainCommand"),
    ("trl_moe_grpo.commands.calibrate", "CalibrateCommand"),
    ("trl_moe_grpo.commands.show_modality_stats", "ShowModalityStatsCommand"),
    ("trl_moe_grpo.commands.measure_routing", "MeasureRoutingCommand"),
    ("trl_moe_grpo.commands.probe_routing", "ProbeRoutingCommand"),
    ("trl_moe_grpo.commands.upcycle", "UpcycleCommand"),
    ("trl_moe_grpo.commands.evaluate_clip", "EvaluateClipCommand"),
]


def build_commands() -> list[Command]:
    import importlib

    commands = []
    for module_path, class_name in COMMAND_PATHS:
        commands.append(getattr(importlib.import_module(module_path), class_name)())
    return commands


def make_parser(commands: list[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-moe-grpo", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for command in commands:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A `MoEGRPOError` (a problem the user can fix, and the fix is in its message) becomes one line
    `trl-moe-grpo <command>: error: ...` on stderr and exit code 2, as argparse reports bad arguments."""
    from .errors import MoEGRPOError

    commands = build_commands()
    args = make_parser(commands).parse_args(argv)
    by_name = {name: command for command in commands for name in (command.name, *command.deprecated_aliases)}
    command = by_name[args.command]
    if args.command != command.name:
        print(command.deprecation_note(args.command), file=sys.stderr)
    try:
        return command.run(args)
    except MoEGRPOError as error:
        print(f"trl-moe-grpo {command.name}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
