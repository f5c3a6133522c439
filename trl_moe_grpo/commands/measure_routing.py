"""`trl-moe-grpo measure-routing` (formerly `analyze-routing`): run one or more models on a dataset's prompts and
measure their routing (routing entropies, task-wise JSD, routing figures).

Named for what it does: it *measures* routing by running the models, where `show-modality-stats` only shows a file
`calibrate` wrote."""

from __future__ import annotations

import argparse
import os

from .base import Command

JSON_NAME = "routing_analysis.json"
FIGURES = {
    "expert_utilization_by_task": "expert_utilization_by_task.png",
    "token_activations": "token_activations.png",
    "routing_probabilities": "routing_probabilities.png",
}


def model_labels(paths: list[str]) -> list[str]:
    """Column names for the models: their folder names, or the paths as given when two folder names collide."""
    names = [os.path.basename(os.path.normpath(path)) or path for path in paths]
    return names if len(set(names)) == len(names) else list(paths)


class MeasureRoutingCommand(Command):
    name = "measure-routing"
    deprecated_aliases = ("analyze-routing",)
    help = (
        "Run MoE models on a dataset's prompts and measure their stock top-K routing: sequence routing entropy, mean "
        "gate entropy and task-wise Jensen-Shannon divergence (nats), several models side by side, with figures. "
        "(To show the modality statistics file `calibrate` wrote, use `show-modality-stats`.)"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("models", nargs="+", metavar="MODEL", help="model folders or hub names, e.g. before after")
        parser.add_argument(
            "--dataset", required=True, help="a dataset folder (save_to_disk), a data file or hub name"
        )
        parser.add_argument("--split", default="train")
        parser.add_argument("--num-samples", type=int, default=256, help="prompts to run (the split's first ones)")
        parser.add_argument("--task-column", default="task", help="column naming each row's task (default: task)")
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--example", type=int, default=0, help="row drawn in the token-level figures")
        parser.add_argument(
            "--output-dir", help=f"write {JSON_NAME} and the figures ({', '.join(FIGURES.values())}) here"
        )
        parser.add_argument("--trust-remote-code", action="store_true", help="allow the models' own code to run")

    def run(self, args: argparse.Namespace) -> int:
        from pathlib import Path

        from ..analysis.routing import (
            analyze_routing,
            format_routing_table,
            plot_expert_utilization_by_task,
            plot_routing_probabilities,
            plot_token_activations,
            save_routing_analyses,
        )
        from ..errors import MoEGRPOError
        from ..loading import load_dataset_split, load_model_and_processor
        from ..routing import RoutingController

        if args.num_samples < 1 or args.batch_size < 1:
            raise MoEGRPOError("--num-samples and --batch-size must be at least 1.")
        try:
            dataset = load_dataset_split(args.dataset, args.split)
        except (OSError, ValueError, KeyError) as error:
            detail = "it has no such split" if isinstance(error, KeyError) else error
            raise MoEGRPOError(f"Cannot load split {args.split!r} of dataset {args.dataset!r}: {detail}") from error
        rows = [dataset[i] for i in range(min(args.num_samples, len(dataset)))]

        analyses = []
        for path, label in zip(args.models, model_labels(args.models)):
            try:
                model, processor, vision_token_ids = load_model_and_processor(path, args.trust_remote_code)
            except (OSError, ValueError, KeyError) as error:
                raise MoEGRPOError(f"Cannot load model {path!r}: {error}") from error
            controller = RoutingController(model, vision_token_ids=vision_token_ids)
            try:
                analysis = analyze_routing(
                    model, controller, processor, rows, args.batch_size, args.task_column, label, args.example
                )
            finally:
                controller.remove()
            analysis.model["path"] = path
            analyses.append(analysis)
            del model, controller

        print(format_routing_table(analyses))
        if args.output_dir is None:
            return 0
        output = Path(args.output_dir)
        info = {"dataset": args.dataset, "split": args.split, "num_samples": len(rows), "example_row": args.example}
        written = [save_routing_analyses(analyses, output / JSON_NAME, **info)]
        written.append(plot_expert_utilization_by_task(analyses, output / FIGURES["expert_utilization_by_task"]))
        written.append(plot_token_activations(analyses, output / FIGURES["token_activations"]))
        written.append(plot_routing_probabilities(analyses, output / FIGURES["routing_probabilities"]))
        print(f"Wrote {', '.join(p.name for p in written)} to {output}")
        return 0


AnalyzeRoutingCommand = MeasureRoutingCommand  # the class's name before the command was renamed
