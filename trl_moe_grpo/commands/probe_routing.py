"""`trl-moe-grpo probe-routing`: before training, does routing decide any reward? (route sensitivity)"""

from __future__ import annotations

import argparse

from .base import Command


class ProbeRoutingCommand(Command):
    name = "probe-routing"
    help = (
        "Before training: the share of prompts whose G sampled-routing rollouts disagree in reward (the signal "
        "MoE-GRPO learns from), with sampled tokens, a larger G and top-K routing beside it to show which lever "
        "raises it."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("models", nargs="+", metavar="MODEL", help="model folders or hub names")
        parser.add_argument(
            "--dataset", required=True, help="a dataset folder (save_to_disk), a data file or hub name"
        )
        parser.add_argument("--split", default="train")
        parser.add_argument(
            "--reward",
            action="append",
            required=True,
            metavar="NAME",
            help="reward function, as in a recipe's reward_funcs: a TRL script name (accuracy_reward, ...) or a "
            "dotted import path (e.g. trl_moe_grpo.demo.visual_mc.accuracy_reward); repeat to sum several",
        )
        parser.add_argument("--num-prompts", type=int, default=32, help="prompts to probe (the split's first ones)")
        parser.add_argument("--num-generations", type=int, default=8, help="G, rollouts per prompt (default 8)")
        parser.add_argument("--max-completion-length", type=int, default=16, help="new tokens per rollout at most")
        parser.add_argument("--temperature", type=float, default=1.0, help="of the sampled-token settings")
        parser.add_argument("--prompts-per-batch", type=int, default=4, help="prompts per generate call")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--no-compare", action="store_true", help="measure only sampled routing with greedy tokens at G"
        )
        parser.add_argument("--trust-remote-code", action="store_true", help="allow the models' own code to run")

    def run(self, args: argparse.Namespace) -> int:
        import torch

        from ..analysis.route_sensitivity import format_route_sensitivity
        from ..errors import MoEGRPOError
        from ..loading import load_dataset_split, load_model_and_processor
        from ..routing import RoutingController
        from ..scripts.grpo import load_reward_function

        if min(args.num_prompts, args.num_generations, args.max_completion_length, args.prompts_per_batch) < 1:
            raise MoEGRPOError(
                "--num-prompts, --num-generations, --max-completion-length and --prompts-per-batch must be >= 1."
            )
        reward_funcs = [load_reward_function(name) for name in args.reward]
        try:
            dataset = load_dataset_split(args.dataset, args.split)
        except (OSError, ValueError, KeyError) as error:
            detail = "it has no such split" if isinstance(error, KeyError) else error
            raise MoEGRPOError(f"Cannot load split {args.split!r} of dataset {args.dataset!r}: {detail}") from error
        rows = [dataset[i] for i in range(min(args.num_prompts, len(dataset)))]
        if not rows or "prompt" not in rows[0]:
            raise MoEGRPOError(f"Dataset {args.dataset!r} has no rows with a `prompt` column to probe.")

        group = args.num_generations
        for path in args.models:
            try:
                model, processor, vision_token_ids = load_model_and_processor(path, args.trust_remote_code)
            except (OSError, ValueError, KeyError) as error:
                raise MoEGRPOError(f"Cannot load model {path!r}: {error}") from error
            controller = RoutingController(model, vision_token_ids=vision_token_ids)
            torch.manual_seed(args.seed)
            try:
                results = probe_settings(model, controller, processor, rows, reward_funcs, args)
            finally:
                controller.remove()
            print(f"{path}: {len(rows)} prompts of {args.dataset} ({args.split}), rewards {', '.join(args.reward)}")
            print(format_route_sensitivity(results))
            share = results[0][1].share_with_spread(group)
            if share < 0.1:
                print(
                    f"Only {share:.0%} of prompts give MoE-GRPO a learning signal at G={group} with greedy tokens: "
                    "routing rarely decides the reward. Levers: the settings above that raise the share (a larger "
                    "num_generations, greedy_decoding=False), experts that differ more (e.g. upcycling noise), or "
                    "prompts closer to the model's decision boundary."
                )
            del model, controller
        return 0


def probe_settings(model, controller, processor, rows, reward_funcs, args: argparse.Namespace) -> list:
    """`(label, RouteSensitivity, G)` per setting the command prints: MoE-GRPO's first, then the levers."""
    from ..analysis.route_sensitivity import measure_route_sensitivity

    def measure(routing: str, greedy: bool, num_generations: int):
        return measure_route_sensitivity(
            model,
            controller,
            processor,
            rows,
            reward_funcs,
            num_generations,
            routing,
            greedy,
            temperature=args.temperature,
            max_completion_length=args.max_completion_length,
            prompts_per_batch=args.prompts_per_batch,
        )

    group = args.num_generations
    if args.no_compare:
        return [("sampled routing, greedy tokens (MoE-GRPO)", measure("sample", True, group), group)]
    # The first G of 2G i.i.d. rollouts are a G-rollout sample: one generation gives both lines.
    main = measure("sample", True, 2 * group)
    return [
        ("sampled routing, greedy tokens (MoE-GRPO)", main, group),
        ("  ... with a larger G", main, 2 * group),
        ("sampled routing, sampled tokens", measure("sample", False, group), group),
        ("top-K routing, sampled tokens (plain GRPO)", measure("topk", False, group), group),
    ]
