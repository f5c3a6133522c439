"""Route sensitivity before training: the share of prompts whose G sampled-routing rollouts disagree in reward.

MoE-GRPO learns only from prompt groups whose rollouts got different rewards (GRPO's advantage is zero otherwise), and
its rollouts differ only through their routing (text is decoded greedily). This measures, for each model and each task
family of `visual_mc`'s test split (seed 10000), the share of prompts with at least one rewarded and one unrewarded
rollout among `--num-rollouts` greedy rollouts routed by sampling, as MoE-GRPO rolls out. One-letter tasks decide their
answer at the prompt's last position; the reasoning task `tally` writes its working first, so the routing of every
generated token can change the answer.

    python benchmarks/route_sensitivity.py                       # both bundled models, one-letter tasks and tally
    python benchmarks/route_sensitivity.py --models M1 M2 --num-prompts 128 --json out.json
    python benchmarks/route_sensitivity.py --smoke               # 8 prompts, 2 rollouts (CI)

Each bundled model's build report records the same measure (`some_correct_some_wrong` of its `sampled_routing`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"one-letter": None, "reasoning": ("tally",)}  # None: the quickstart's six tasks


def route_sensitivity(
    model,
    processor,
    rows: list[dict],
    reward: Callable,
    num_rollouts: int = 8,
    max_new_tokens: int = 4,
    seed: int = 0,
    batch_prompts: int = 16,
) -> dict[str, float]:
    """`trl_moe_grpo.analysis.route_sensitivity.measure_route_sensitivity` (what `trl-moe-grpo probe-routing` runs)
    with MoE-GRPO's rollouts: `num_rollouts` greedy rollouts per row, routed by sampling. Returns the share of rows
    whose rollouts disagree in reward (`route_sensitivity`), the mean reward of the rollouts, the share of rows whose
    completions are not all the same text and, with a `task` column, the route sensitivity of each task."""
    from trl_moe_grpo.analysis.route_sensitivity import measure_route_sensitivity
    from trl_moe_grpo.routing import RoutingController
    from trl_moe_grpo.routing.introspection import vision_token_ids

    controller = RoutingController(model, vision_token_ids=vision_token_ids(model))
    torch.manual_seed(seed)
    try:
        measured = measure_route_sensitivity(
            model,
            controller,
            processor,
            rows,
            [reward],
            num_generations=num_rollouts,
            max_completion_length=max_new_tokens,
            prompts_per_batch=batch_prompts,
        )
    finally:
        controller.remove()
    result = {
        "route_sensitivity": measured.share_with_spread(),
        "rollout_reward": measured.mean_reward(),
        "completions_not_all_equal": measured.share_with_distinct_completions(),
    }
    spread = (measured.rewards.amax(-1) != measured.rewards.amin(-1)).tolist()
    tasks = [row.get("task", "all") for row in rows]
    if len(set(tasks)) > 1:
        for task in dict.fromkeys(tasks):
            flags = [flag for flag, t in zip(spread, tasks) if t == task]
            result[f"route_sensitivity/{task}"] = sum(flags) / len(flags)
    return result


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", default=["bundled/tiny-internvl-moe", "bundled/tiny-internvl-moe-reason"]
    )
    parser.add_argument("--num-prompts", type=int, default=96, help="test prompts per task family")
    parser.add_argument("--num-rollouts", type=int, default=8, help="G: sampled-routing rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="one-letter tasks (paper_tables' default)")
    parser.add_argument("--reasoning-max-new-tokens", type=int, default=64, help="the reasoning task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="8 prompts, 2 rollouts")
    return parser


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from trl_moe_grpo.demo.visual_mc import TASKS, accuracy_reward, visual_mc_rows

    args = make_parser().parse_args(argv)
    if args.smoke:
        args.num_prompts, args.num_rollouts = 8, 2
    results: dict[str, dict] = {}
    for name in args.models:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(name)
        for family, tasks in FAMILIES.items():
            rows = visual_mc_rows(args.num_prompts, seed=10_000, tasks=tasks or TASKS)
            tokens = args.reasoning_max_new_tokens if family == "reasoning" else args.max_new_tokens
            start = time.perf_counter()
            measured = route_sensitivity(model, processor, rows, accuracy_reward, args.num_rollouts, tokens, args.seed)
            results.setdefault(name, {})[family] = measured | {
                "max_new_tokens": tokens,
                "seconds": round(time.perf_counter() - start, 1),
            }
    lines = [
        f"Route sensitivity: share of {args.num_prompts} test prompts whose G={args.num_rollouts} sampled-routing "
        "greedy rollouts disagree in reward (mean reward of the rollouts in brackets).",
        "",
        "| model | " + " | ".join(FAMILIES) + " |",
        "| --- |" + " --- |" * len(FAMILIES),
    ]
    for name, families in results.items():
        cells = [f"{m['route_sensitivity']:.3f} ({m['rollout_reward']:.3f})" for m in families.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
