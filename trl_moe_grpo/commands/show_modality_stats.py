"""`trl-moe-grpo show-modality-stats` (formerly `analyze`): show a modality statistics file as a table and,
optionally, a heatmap.

Named for what it does: it *shows* the file `calibrate` wrote and runs no model, where `measure-routing` runs models
on a dataset to measure their routing."""

from __future__ import annotations

import argparse

from .base import Command


class ShowModalityStatsCommand(Command):
    name = "show-modality-stats"
    deprecated_aliases = ("analyze",)
    help = (
        "Show a modality statistics file written by `calibrate` (no model runs): the vision score of every layer and "
        "expert and the experts the mask ratio removes, as a table and optionally a heatmap. (To run models on a "
        "dataset and measure their routing, use `measure-routing`.)"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("stats", help="statistics file written by `trl-moe-grpo calibrate`")
        parser.add_argument("--plot", help="write a heatmap PNG here")
        parser.add_argument("--mask-ratio", type=float, help="P to mark masked experts with (default: the file's)")

    def run(self, args: argparse.Namespace) -> int:
        from ..analysis.modality import modality_table, plot_modality_scores
        from ..errors import MoEGRPOError
        from ..guidance import ModalityStatistics

        stats = ModalityStatistics.load(args.stats)
        ratio = args.mask_ratio if args.mask_ratio is not None else stats.mask_ratio
        if ratio is None:
            raise MoEGRPOError(f"{args.stats} holds no mask ratio: pass --mask-ratio P (e.g. 0.25).")
        print(modality_table(stats, ratio))
        if args.plot:
            print(f"Heatmap written to {plot_modality_scores(stats, ratio, args.plot)}")
        return 0


AnalyzeCommand = ShowModalityStatsCommand  # the class's name before the command was renamed
