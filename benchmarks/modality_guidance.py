"""Masked vs unmasked sampled routing (the paper's Fig. 3 claim) on the quickstart task, measured in one run.

Trains the quickstart recipe's model once per exploration setting, same seed and data, and prints the training reward
per logged step side by side, the mean over the last half of training, and held-out accuracy before -> after:

- `masked`: MoE-GRPO with modality-aware guidance (P = 0.25),
- `multi`: modality-agnostic sampling (P = 0),
- `noise`: Gaussian noise on the gate log-scores, then top-K.

    python benchmarks/modality_guidance.py --max-steps 40
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "masked (P=0.25)": ["--modality_mask_ratio", "0.25"],
    "multi (P=0)": ["--modality_mask_ratio", "0"],
    "noise": ["--rollout_routing", "noise"],
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/quickstart.yaml")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("extra", nargs="*", help="more recipe flags, e.g. --learning_rate 5e-4")
    return parser


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = make_parser().parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import train

    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in VARIANTS.items():
            output_dir = Path(tmp) / name.split()[0]
            recipe = ["--config", args.config, "--output_dir", str(output_dir), "--max_steps", str(args.max_steps)]
            reports[name] = train.main(
                [*recipe, "--seed", str(args.seed), "--disable_tqdm", "true", *flags, *args.extra]
            )

    names = list(reports)
    steps = [r["step"] for r in reports[names[0]]["rewards"]]
    print(f"\ntraining reward per logged step ({args.max_steps} steps, seed {args.seed})")
    print("step  " + "  ".join(f"{n:>16}" for n in names))
    for i, step in enumerate(steps):
        print(f"{step:>4}  " + "  ".join(f"{reports[n]['rewards'][i]['reward']:>16.3f}" for n in names))
    half = len(steps) // 2
    print(
        "last-half mean  "
        + "  ".join(
            f"{sum(r['reward'] for r in reports[n]['rewards'][half:]) / max(len(steps) - half, 1):>10.3f}"
            for n in names
        )
    )
    for name in names:
        accuracy = reports[name]["held_out_accuracy"]
        print(f"{name:<16} held-out accuracy {accuracy['before']['all']:.3f} -> {accuracy['after']['all']:.3f}")
    return reports


if __name__ == "__main__":
    main()
