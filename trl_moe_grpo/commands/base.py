"""The base class of `trl-moe-grpo` commands."""

from __future__ import annotations

import argparse


class Command:
    """One `trl-moe-grpo <name>` command.

    Subclasses set `name` and `help`, add their arguments in `add_arguments`, and do the work in `run`, importing
    heavy modules (torch, transformers) there rather than at module level.
    """

    name: str = ""
    help: str = ""

    def register(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(self.name, help=self.help, description=self.help)
        self.add_arguments(parser)
        return parser

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to `parser`."""

    def run(self, args: argparse.Namespace) -> int:
        """Do the work; return the process exit code."""
        raise NotImplementedError
