"""How often the G rollouts of a prompt carry reward spread, per lever (`docs/design.md` §11), on the quickstart.

Each arm trains the quickstart recipe (`recipes/quickstart.yaml`: the bundled tiny MoE VLM, the visual multiple-choice
data) for `--steps` steps with one lever changed, and reports the per-step `routing/reward_spread_share` (share of
groups whose rewards are not all equal) averaged over the steps, with its standard error over steps, the mean training
reward and the wall time. With regeneration, the share before it (`first generation`) is reported too. Arms share the
seed, so their first batches hold the same prompts.

    python -m trl_moe_grpo.demo.visual_mc data/visual_mc      # the data, once
    python benchmarks/reward_spread_levers.py --steps 20
    python benchmarks/reward_spread_levers.py --arms paper temperature_2 --steps 5 --json spread.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from stats import standard_error

ARMS: dict[str, list[str]] = {
    "paper": [],
    "temperature_2": ["--rollout_routing_temperature", "2.0"],
    "temperature_4": ["--rollout_routing_temperature", "4.0"],
    "sampled_tokens": ["--greedy_decoding", "false"],
    "G_16": ["--num_generations", "16"],
    "regenerate_2": ["--regenerate_zero_spread_groups", "2"],
    "exclude_from_normalizer": ["--zero_spread_groups", "exclude_from_normalizer"],
    "entropy_0.01": ["--router_entropy_coef", "0.01"],
    "router_warmup_10": ["--router_warmup_steps", "10"],
}


def run_arm(name: str, steps: int, recipe: str, data: str) -> dict:
    from trl_moe_grpo.scripts.grpo import main, make_parser

    with tempfile.TemporaryDirectory() as output_dir:
        argv = ["--config", recipe, "--dataset_name", data, "--max_steps", str(steps), "--logging_steps", "1"]
        argv += ["--report", "false", "--output_dir", output_dir, "--disable_tqdm", "true", *ARMS[name]]
        script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
        history: list[dict] = []

        import trl_moe_grpo.trainer.grpo_trainer as grpo_trainer

        class KeepingHistory(grpo_trainer.MoEGRPOTrainer):
            def train(self, *args, **kwargs):
                try:
                    return super().train(*args, **kwargs)
                finally:
                    history.extend(self.state.log_history)

            def save_model(self, *args, **kwargs):  # nothing to keep
                return None

        original = grpo_trainer.MoEGRPOTrainer
        grpo_trainer.MoEGRPOTrainer = KeepingHistory
        start = time.perf_counter()
        try:
            main(script_args, training_args, model_args)
        finally:
            grpo_trainer.MoEGRPOTrainer = original
        seconds = time.perf_counter() - start
    logs = [log for log in history if "routing/reward_spread_share" in log]
    shares = [log["routing/reward_spread_share"] for log in logs]
    first = [
        log["routing/reward_spread_share_first_generation"]
        for log in logs
        if "routing/reward_spread_share_first_generation" in log
    ]
    return {
        "arm": name,
        "steps": len(shares),
        "spread_share": statistics.fmean(shares),
        "spread_share_se": standard_error(shares),
        "first_generation_share": statistics.fmean(first) if first else None,
        "reward": statistics.fmean(log["reward"] for log in logs),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--data", default="data/visual_mc")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = [run_arm(name, args.steps, args.recipe, args.data) for name in args.arms]
    print("| arm | steps | reward spread share (± s.e. over steps) | before regeneration | mean reward | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        first = "" if row["first_generation_share"] is None else f"{row['first_generation_share']:.3f}"
        print(
            f"| {row['arm']} | {row['steps']} | {row['spread_share']:.3f} ± {row['spread_share_se']:.3f} | {first} | "
            f"{row['reward']:.3f} | {row['seconds']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
