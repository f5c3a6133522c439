"""Rebuild the bundled tiny CLIP from nothing, reproducibly by seed (a few minutes on 2 CPU cores).

1. A tiny dense CLIP (`trl_moe_grpo.testing.clip`): 32x32 images in 8x8 patches, vision width 64 x 4 layers, text
   width 64 x 2 layers, a word-level tokenizer over the generated world's vocabulary, CLIP's image processor at 32x32.
2. Brief contrastive pre-training on generated image-caption pairs (`trl_moe_grpo.clip_moe.images.caption_pairs`:
   four object families, eight colours, mostly plain images with some sketches, inversions, noise and rotations).
3. Zero-shot top-1 accuracy of the result on every classification suite of the miniature (held-out draws), written
   to `build_report.json` beside the model.

    python scripts/build_tiny_clip.py --output bundled/tiny-clip

The CLIP-MoE of the miniature is upcycled from it (`trl-moe-grpo upcycle bundled/tiny-clip --output DIR`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trl_moe_grpo.clip_moe.contrastive import pretrain_contrastive
from trl_moe_grpo.clip_moe.evaluation import evaluate_suites
from trl_moe_grpo.clip_moe.images import SUITES
from trl_moe_grpo.testing.clip import tiny_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bundled/tiny-clip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--num-pairs", type=int, default=40_000)
    parser.add_argument("--eval-per-class", type=int, default=25, help="held-out images per class for the report")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.time()
    model, tokenizer, image_processor = tiny_clip(args.seed)
    pretrain = pretrain_contrastive(
        model,
        tokenizer,
        image_processor,
        num_pairs=args.num_pairs,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    image_processor.save_pretrained(output)
    accuracy = evaluate_suites(model, tokenizer, image_processor, list(SUITES), per_class=args.eval_per_class, seed=1)
    report = {
        "seed": args.seed,
        "pretrain_steps": pretrain.steps,
        "pretrain_final_loss": round(pretrain.final_loss, 4),
        "pretrain_seconds": round(pretrain.seconds, 1),
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "num_pairs": args.num_pairs,
        "zero_shot_top1": {name: round(value, 4) for name, value in accuracy.items()},
        "chance": {name: round(1 / len(suite.classes), 4) for name, suite in SUITES.items()},
        "seconds": round(time.time() - start, 1),
    }
    (output / "build_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
