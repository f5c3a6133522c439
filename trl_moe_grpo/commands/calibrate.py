"""`trl-moe-grpo calibrate`: measure a model's modality statistics and write them to a JSON file."""

from __future__ import annotations

import argparse

from .base import Command


class CalibrateCommand(Command):
    name = "calibrate"
    help = "Count, per MoE layer, how often vision and text tokens choose each expert under top-K routing."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", help="model folder or hub name (loaded with from_pretrained)")
        parser.add_argument("--dataset", required=True, help="dataset folder (save_to_disk), data file or hub name")
        parser.add_argument("--split", default="train")
        parser.add_argument("--num-samples", type=int, default=256, help="prompts to run")
        parser.add_argument("--mask-ratio", type=float, default=0.25, help="P: share of experts masked per modality")
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--output", required=True, help="statistics file to write (.json)")
        parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")

    def run(self, args: argparse.Namespace) -> int:
        from ..errors import MoEGRPOError
        from ..guidance import calibrate
        from ..loading import load_dataset_split, load_model_and_processor
        from ..routing import RoutingController

        if not 0 <= args.mask_ratio < 1:
            raise MoEGRPOError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}.")
        model, processor, vision_token_ids = load_model_and_processor(args.model, args.trust_remote_code)
        controller = RoutingController(model, vision_token_ids=vision_token_ids)
        dataset = load_dataset_split(args.dataset, args.split)
        rows = [dataset[i] for i in range(min(args.num_samples, len(dataset)))]
        stats = calibrate(model, controller, processor, rows, args.batch_size, progress=True)
        stats.save(args.output, args.mask_ratio)
        seen = stats.present.tolist()
        print(
            f"Wrote {args.output}: {len(rows)} prompts, {stats.model['num_layers']} MoE layers, "
            f"{stats.model['num_experts']} experts, top-{stats.model['top_k']}; text tokens seen: {seen[0]}, "
            f"vision tokens seen: {seen[1]}."
        )
        return 0
