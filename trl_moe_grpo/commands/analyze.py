"""`trl-moe-grpo analyze`: show a modality statistics file as a table and, optionally, a heatmap."""

from __future__ import annotations

import argparse

from .base import Command


class AnalyzeCommand(Command):
    name = "analyze"
    help = "Print the vision scores per layer and expert of a statistics file, and draw them as a heatmap."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("stats", help="statistics file written by `trl-moe-grpo calibrate`")
        parser.add_argument("--plot", help="write a heatmap PNG here")
        parser.add_argument("--mask-ratio", type=float, help="P to mark masked experts with (default: the file's)")

    def run(self, args: argparse.Namespace) -> int:
        from ..analysis.modality import modality_table, plot_modality_scores
        from ..guidance import ModalityStatistics

        stats = ModalityStatistics.load(args.stats)
        ratio = args.mask_ratio if args.mask_ratio is not None else stats.mask_ratio
        print(modality_table(stats, ratio))
        if args.plot:
            print(f"Heatmap written to {plot_modality_scores(stats, ratio, args.plot)}")
        return 0
