"""The base class of `trl-moe-grpo` commands."""

from __future__ import annotations

import argparse


class Command:
    """One `trl-moe-grpo <name>` command.

    Subclasses set `name` and `help`, add their arguments in `add_arguments`, and do the work in `run`, importing
    heavy modules (torch, transformers) there rather than at module level. A renamed command lists its old names in
    `deprecated_aliases`: they keep working for one release, with a note on stderr (`deprecation_note`).
    """

    name: str = ""
    help: str = ""
    deprecated_aliases: tuple[str, ...] = ()

    def register(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(self.name, help=self.help, description=self.help)
        self.add_arguments(parser)
        for alias in self.deprecated_aliases:
            old = subparsers.add_parser(alias, help=f"deprecated name of `{self.name}`", description=self.help)
            self.add_arguments(old)
        return parser

    def deprecation_note(self, alias: str) -> str:
        """The one line printed to stderr when the command is called by its old name `alias`."""
        return (
            f"trl-moe-grpo: `{alias}` is deprecated and will be removed in the next release; use `{self.name}` "
            "(same arguments)."
        )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to `parser`."""

    def run(self, args: argparse.Namespace) -> int:
        """Do the work; return the process exit code."""
        raise NotImplementedError
