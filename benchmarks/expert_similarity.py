"""How different are a model's experts? Per MoE layer, the mean pairwise relative distance of the experts' weights.

For every MoE layer and weight kind (e.g. `gate_proj`, `up_proj`, `down_proj`), `||W_i - W_j|| / ||W_i||` averaged over
expert pairs, read from the model folder's safetensors files (nothing is unpickled, nothing runs). Upcycled experts
that are copies of one dense MLP plus noise of relative size s sit near `s * sqrt(2)`: they differ, but by chance, not
by skill. Experts trained apart differ by structure, which this number alone cannot tell from noise: read it beside the
route sensitivity (`trl-moe-grpo probe-routing`), which says whether the differences change rewards.

    python benchmarks/expert_similarity.py bundled/tiny-internvl-moe
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

# `...layers.3.mlp.experts.5.up_proj.weight` (one tensor per expert) or `...experts.up_proj` (experts stacked).
PER_EXPERT = re.compile(r"(?P<layer>.*\.experts)\.(?P<expert>\d+)\.(?P<kind>\w+)\.weight$")
STACKED = re.compile(r"(?P<layer>.*\.experts)\.(?P<kind>\w+)$")


def expert_weights(folder: Path) -> dict[tuple[str, str], torch.Tensor]:
    """(layer, kind) -> the experts' weights stacked on the first dimension."""
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    stacked: dict[tuple[str, str], torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            if match := PER_EXPERT.match(name):
                per_expert[match["layer"], match["kind"]][int(match["expert"])] = tensor.float()
            elif (match := STACKED.match(name)) and tensor.dim() == 3:
                stacked[match["layer"], match["kind"]] = tensor.float()
    for key, experts in per_expert.items():
        stacked[key] = torch.stack([experts[i] for i in sorted(experts)])
    if not stacked:
        raise SystemExit(f"{folder}: no expert weights found in its safetensors files.")
    return stacked


def pairwise_relative_distance(weights: torch.Tensor) -> float:
    """Mean over expert pairs (i, j) of ||W_i - W_j|| / ||W_i||."""
    flat = weights.flatten(1)
    return statistics.fmean(
        ((flat[i] - flat[j]).norm() / flat[i].norm()).item() for i, j in itertools.permutations(range(len(flat)), 2)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model folders holding safetensors files")
    args = parser.parse_args()
    for model in args.models:
        distances = {key: pairwise_relative_distance(w) for key, w in sorted(expert_weights(Path(model)).items())}
        mean = statistics.fmean(distances.values())
        print(f"{model}: mean pairwise relative distance of the experts' weights {mean:.3f}")
        for (layer, kind), distance in distances.items():
            print(f"  {layer}.{kind}: {distance:.3f}")


if __name__ == "__main__":
    main()
