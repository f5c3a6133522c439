"""`trl-moe-grpo upcycle`: turn a dense model into an MoE model, or report its parameters with `--dry-run`."""

from __future__ import annotations

import argparse

from .base import Command


class UpcycleCommand(Command):
    name = "upcycle"
    help = (
        "Turn a dense model (Qwen3, Llama, Mistral, InternVL with Qwen3, CLIP) into an MoE model (Qwen3-MoE, Mixtral, "
        "InternVL with Qwen3-MoE, CLIP-MoE), or print its parameter counts with --dry-run."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", nargs="?", help="dense model: local folder (safetensors) or hub name")
        parser.add_argument("--preset", help="a published architecture instead of SOURCE (config only, --dry-run)")
        parser.add_argument("--num-experts", type=int, default=8, help="experts per MoE layer, N (default: 8)")
        parser.add_argument("--top-k", type=int, default=2, help="experts per token, K (default: 2)")
        parser.add_argument("--output", help="output folder (required unless --dry-run)")
        parser.add_argument(
            "--init",
            choices=["noise", "copy", "drop", "multiplet"],
            default="noise",
            help="expert init: noise (default; copy + small noise), copy (exact copies: function unchanged, but no "
            "MoE-GRPO signal), drop (Drop-Upcycling), multiplet (CLIP only: the CLIP-MoE paper's Diversified "
            "Multiplet Upcycling, trained on --pairs)",
        )
        parser.add_argument(
            "--pairs", help="image-caption dataset (`image`, `caption` columns; folder or data file) for multiplet"
        )
        parser.add_argument("--pairs-split", default="train", help="split of --pairs (default: train)")
        parser.add_argument("--noise-std", type=float, default=0.01, help="noise std relative to each weight's std")
        parser.add_argument("--drop-ratio", type=float, default=0.5, help="share of neurons `drop` re-initializes")
        parser.add_argument("--router-std", type=float, default=0.02, help="std of the random router weights")
        parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
        parser.add_argument(
            "--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB (default: 5GB)"
        )
        parser.add_argument("--overwrite", action="store_true", help="replace a model already in --output")
        parser.add_argument(
            "--dry-run", action="store_true", help="only print total and active parameters (meta device, no memory)"
        )

    def run(self, args: argparse.Namespace) -> int:
        from ..clip_moe.convert import is_clip_folder
        from ..errors import MoEGRPOError
        from ..upcycle import ExpertInit, parameter_report, upcycle

        if args.dry_run and args.source is not None and is_clip_folder(args.source):
            from ..clip_moe.convert import clip_parameter_summary

            print(clip_parameter_summary(args.source, args.num_experts, args.top_k))
            return 0
        if args.dry_run:
            report = parameter_report(args.source, args.num_experts, args.top_k, preset=args.preset)
            print(report.format_table())
            return 0
        if args.preset is not None:
            raise MoEGRPOError("A preset holds a config, no weights: use it with --dry-run, or pass SOURCE.")
        if args.source is None or args.output is None:
            raise MoEGRPOError("Pass SOURCE and --output DIR (or --dry-run to only count parameters).")
        if args.init == "multiplet" and not is_clip_folder(args.source):
            raise MoEGRPOError("--init multiplet (Diversified Multiplet Upcycling) applies to CLIP sources only.")
        init = ExpertInit(
            args.init,
            noise_std=args.noise_std,
            drop_ratio=args.drop_ratio,
            router_std=args.router_std,
            seed=args.seed,
        )
        if is_clip_folder(args.source):  # CLIP -> CLIP-MoE: the vision encoder's MLPs become experts
            from ..clip_moe.convert import upcycle_clip
            from ..loading import load_dataset_split

            pairs = load_dataset_split(args.pairs, args.pairs_split) if args.pairs else None

            result = upcycle_clip(
                args.source,
                args.output,
                args.num_experts,
                args.top_k,
                init=init,
                overwrite=args.overwrite,
                pairs=pairs,
            )
            print(f"{result.summary()}, init={args.init}")
            return 0
        result = upcycle(
            args.source,
            args.output,
            args.num_experts,
            args.top_k,
            init=init,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
        print(result.report.format_table())
        print(
            f"\n{result.conversion}: wrote {len(result.shards)} shard(s), {result.output_bytes / 1e9:.3f} GB "
            f"(source {result.source_bytes / 1e9:.3f} GB), init={args.init}, copied: "
            f"{', '.join(result.copied) or 'nothing'}, to {result.output_dir}"
        )
        return 0
