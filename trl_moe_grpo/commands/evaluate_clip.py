"""`trl-moe-grpo evaluate-clip`: zero-shot top-1 accuracy of CLIP / CLIP-MoE models on image classification data."""

from __future__ import annotations

import argparse

from .base import Command


def parse_dataset_argument(value: str) -> tuple[str, str]:
    """`NAME=PATH` -> (NAME, PATH); a bare PATH is named after its last path component."""
    import os

    if "=" in value:
        name, path = value.split("=", 1)
        return name, path
    return os.path.basename(os.path.normpath(value)) or value, value


class EvaluateClipCommand(Command):
    name = "evaluate-clip"
    help = (
        "Zero-shot top-1 accuracy (stock top-K routing) of CLIP or CLIP-MoE models on image classification datasets "
        "with `image` and `label` columns; one table row per model, one column per dataset, plus the average."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("models", nargs="+", metavar="MODEL", help="model folders (with tokenizer and processor)")
        parser.add_argument(
            "--dataset",
            action="append",
            required=True,
            metavar="[NAME=]PATH",
            help="a dataset folder (save_to_disk) or data file; repeat for several (they form the table's columns)",
        )
        parser.add_argument("--split", default="test", help="split of each dataset (default: test)")
        parser.add_argument(
            "--source",
            metavar="NAME",
            help="the dataset trained on: shown first, left out of the average (as in cross-dataset and "
            "shifted-domain tables, whose average is over the other datasets)",
        )
        parser.add_argument("--template", default="a photo of a {}", help="class prompt, {} is the class name")
        parser.add_argument(
            "--class-names", help="comma-separated class names in label order (default: the label ClassLabel's)"
        )
        parser.add_argument("--batch-size", type=int, default=256)
        parser.add_argument("--output-json", help="also write the accuracies here as JSON")

    def run(self, args: argparse.Namespace) -> int:
        import json

        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        from .. import clip_moe  # noqa: F401  (registers CLIP-MoE with the Auto classes)
        from ..clip_moe.evaluation import format_table, zero_shot_accuracy
        from ..errors import MoEGRPOError
        from ..loading import load_dataset_split

        datasets = dict(parse_dataset_argument(value) for value in args.dataset)
        if args.source is not None:
            if args.source not in datasets:
                raise MoEGRPOError(f"--source {args.source!r} is not one of the datasets: {', '.join(datasets)}.")
            if len(datasets) < 2:
                raise MoEGRPOError("--source leaves no dataset to average: pass the target datasets too.")
            datasets = {args.source: datasets[args.source], **datasets}
        class_names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
        if class_names is not None and len(datasets) > 1:
            raise MoEGRPOError("`--class-names` applies to one dataset; pass one --dataset with it.")
        loaded = {name: load_dataset_split(path, args.split) for name, path in datasets.items()}
        results = {}
        for path in args.models:
            try:
                model = AutoModel.from_pretrained(path).eval()
                tokenizer = AutoTokenizer.from_pretrained(path)
                image_processor = AutoImageProcessor.from_pretrained(path)
            except (OSError, ValueError) as error:
                raise MoEGRPOError(
                    f"Could not load a CLIP with its tokenizer and image processor from {path!r} ({error})."
                ) from error
            results[path] = {
                name: zero_shot_accuracy(
                    model, tokenizer, image_processor, dataset, class_names, args.template, args.batch_size
                )
                for name, dataset in loaded.items()
            }
        rows = {}
        for path, accuracy in results.items():
            cells = {name: f"{100 * value:.1f}" for name, value in accuracy.items()}
            averaged = [value for name, value in accuracy.items() if name != args.source]
            cells["average"] = f"{100 * sum(averaged) / len(averaged):.1f}"
            rows[path] = cells
        print(format_table(rows, list(loaded)))
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(results, f, indent=1)
        return 0
