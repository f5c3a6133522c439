"""Miniature paper tables: MoE-GRPO against the paper's baselines and ablations, several seeds, several test splits.

Every arm starts from the same model, trains on the same training split for the same number of steps with the same
seeds and learning rates, and is scored on the same rows of every test split with greedy decoding and the stock top-K
routing (as at inference). The paper's claims are about generalization (its Table 1 trains on one instruction mix and
scores other benchmarks), so the headline number is the **generalization average**: the mean of the overall accuracies
of the `--generalization-splits`. For `visual_mc` these are `test_shifted` (the held-out rows in image styles never
trained on) and `test_heldout_tasks` (task compositions never trained on); the in-distribution split `test` (held-out
rows of the training tasks) is reported beside it, as its own column. Reinforcement-learning arms see
`--prompts-per-step` prompts per step, each rolled out `--num-generations` times; fine-tuning arms see the same number
of prompts per step with their answers.

- Table 1, baselines: Det-FT, Stoch-FT-Multi, Stoch-FT-Noise (supervised fine-tuning with top-K, sampled and noisy
  routing), plain GRPO with top-K routing replayed (R3), MoE-GRPO.
- Table 4, loss ablation: token-only, gate-only, both.
- Table 5, exploration: noise, modality-agnostic sampling (P=0), modality-masked sampling (MoE-GRPO).
- Table 7, routing schemes: Expert Choice and Sinkhorn routing (fine-tuning) with and without the load-balancing loss,
  MoE-GRPO with and without it.
- Routing analysis of every arm: mean per-token gate entropy, routing entropy over each sequence (entropy of the
  expert-selection frequencies), task-wise Jensen-Shannon divergence of expert selections, router weight change.

    python benchmarks/paper_tables.py                           # every table, seeds 0-4 -> docs/results.md
    python benchmarks/paper_tables.py --tables 1 --seeds 0 1 2  # Table 1 only, 3 seeds
    python benchmarks/paper_tables.py --smoke                   # 2 steps of every arm, 16 rows per test split (CI)
    python benchmarks/paper_tables.py --model MODEL --dataset DATA --test-splits test ood --reward exact

`--dataset` is `visual_mc` (the project's generated tasks) or any dataset with a `prompt`, an optional `image` or
`images`, an `answer` and a `task` column. The first of `--test-splits` is the in-distribution one; the generalization
average is over `--generalization-splits` (by default every test split after the first; none when there is only
one). Results are kept per (arm, seed) in a JSON file next to the report, so an interrupted run resumes where it
stopped; a change of settings starts afresh. A hand-written reading of the numbers, `<report>-findings.md` beside the
report (e.g. `docs/results-findings.md`), is included in the report under "Findings" and survives a re-run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from stats import mean_pm, mean_std, paired_difference

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Arm:
    """One training method: which trainer, and the options that make it this method."""

    name: str
    label: str
    trainer: Literal["grpo", "sft"]
    options: dict[str, Any] = field(default_factory=dict)


NO_LB = {"router_aux_loss_coef": 0.0}
ARMS = {
    arm.name: arm
    for arm in [
        Arm("det_ft", "Det-FT (fine-tuning, top-K)", "sft", {"train_routing": "topk"}),
        Arm("stoch_ft_multi", "Stoch-FT-Multi (fine-tuning, sampled K)", "sft", {"train_routing": "sample"}),
        Arm("stoch_ft_noise", "Stoch-FT-Noise (fine-tuning, noisy top-K)", "sft", {"train_routing": "noise"}),
        Arm("grpo_r3", "GRPO, top-K routing replayed (R3)", "grpo", {"rollout_routing": "topk", "gate_loss_coef": 0}),
        Arm("moe_grpo", "MoE-GRPO", "grpo"),
        Arm("token_only", "MoE-GRPO, Token-GRPO only", "grpo", {"gate_loss_coef": 0.0}),
        Arm("gate_only", "MoE-GRPO, Gate-GRPO only", "grpo", {"token_loss_coef": 0.0}),
        Arm("explore_noise", "exploration: noise on the gates", "grpo", {"rollout_routing": "noise"}),
        Arm("explore_multi", "exploration: modality-agnostic (P=0)", "grpo", {"modality_mask_ratio": 0.0}),
        Arm("ec_lb", "Expert Choice + LB (fine-tuning)", "sft", {"train_routing": "expert_choice"}),
        Arm("ec", "Expert Choice, no LB (fine-tuning)", "sft", {"train_routing": "expert_choice", **NO_LB}),
        Arm("sinkhorn_lb", "Sinkhorn (OT) + LB (fine-tuning)", "sft", {"train_routing": "sinkhorn"}),
        Arm("sinkhorn", "Sinkhorn (OT), no LB (fine-tuning)", "sft", {"train_routing": "sinkhorn", **NO_LB}),
        Arm("moe_grpo_no_lb", "MoE-GRPO, no LB", "grpo", NO_LB),
        # The levers of docs/design.md §11, one at a time, at settings fixed before any run (docs/results-plan.md).
        Arm("lever_sampled_tokens", "MoE-GRPO + sampled tokens", "grpo", {"greedy_decoding": False}),
        Arm("lever_temperature", "MoE-GRPO + routing temperature 2", "grpo", {"rollout_routing_temperature": 2.0}),
        Arm(
            "lever_exclude",
            "MoE-GRPO + zero-spread groups out of the normalizer",
            "grpo",
            {"zero_spread_groups": "exclude_from_normalizer"},
        ),
        Arm(
            "lever_regenerate",
            "MoE-GRPO + zero-spread groups regenerated (2x)",
            "grpo",
            {"regenerate_zero_spread_groups": 2},
        ),
        Arm("lever_g16", "MoE-GRPO + G = 16", "grpo", {"num_generations": 16}),
        Arm("lever_entropy", "MoE-GRPO + router entropy bonus 0.01", "grpo", {"router_entropy_coef": 0.01}),
        Arm("lever_warmup", "MoE-GRPO + router warm-up (10% of steps)", "grpo", {"router_warmup_steps": "10%"}),
    ]
}

# The paper's numbers for each table (average accuracy, %), as margins against MoE-GRPO where it gives them.
TABLES: dict[str, tuple[str, list[str], dict[str, float]]] = {
    "1": (
        "Table 1: MoE-GRPO against fine-tuning baselines",
        ["det_ft", "stoch_ft_multi", "stoch_ft_noise", "grpo_r3", "moe_grpo"],
        {"det_ft": 54.0, "stoch_ft_multi": 53.7, "stoch_ft_noise": 54.3, "moe_grpo": 56.0},
    ),
    "4": (
        "Table 4: which loss terms",
        ["token_only", "gate_only", "moe_grpo"],
        {"token_only": 55.7 - 1.8, "gate_only": 50.9, "moe_grpo": 55.7},
    ),
    "5": (
        "Table 5: exploration during rollouts",
        ["explore_noise", "explore_multi", "moe_grpo"],
        {"explore_noise": -1.5, "explore_multi": -0.9, "moe_grpo": 0.0},
    ),
    "7": (
        "Table 7: routing schemes and the load-balancing loss",
        ["ec_lb", "ec", "sinkhorn_lb", "sinkhorn", "moe_grpo_no_lb", "moe_grpo"],
        {"ec_lb": -1.0, "sinkhorn_lb": -1.3, "moe_grpo_no_lb": -0.9, "moe_grpo": 0.0},
    ),
    "L": (
        "Levers: what gives routing rewards a signal (not in the paper)",
        [
            "lever_sampled_tokens",
            "lever_temperature",
            "lever_exclude",
            "lever_regenerate",
            "lever_g16",
            "lever_entropy",
            "lever_warmup",
            "moe_grpo",
        ],
        {},
    ),
}
PAPER_NOTES = {
    "1": "paper: average accuracy (%) over its benchmarks",
    "4": "paper: average accuracy (%); token-only is 1.8 below both terms",
    "5": "paper: margin (points) against MoE-GRPO with modality guidance",
    "7": "paper: margin (points) against MoE-GRPO with LB; LB adds 0.9 to MoE-GRPO",
    "L": "not in the paper: each lever is off by default",
}
FIGURE_ARMS = ("det_ft", "moe_grpo")
PAPER_ANALYSIS = "paper: routing entropy over a 2K-token sequence 1.05 -> 1.82; task-wise JSD 0.06 -> 0.20"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled/tiny-internvl-moe", help="MoE model folder or hub name")
    parser.add_argument("--dataset", default="visual_mc", help="`visual_mc`, a data file, a saved folder or a name")
    parser.add_argument("--train-split", default="train")
    parser.add_argument(
        "--test-splits",
        "--test-split",
        nargs="+",
        default=None,
        help="splits scored, side by side; the first is the in-distribution one (visual_mc: test test_shifted "
        "test_heldout_tasks; otherwise: test)",
    )
    parser.add_argument(
        "--generalization-splits",
        nargs="+",
        default=None,
        help="test splits averaged into the headline generalization accuracy (default: every test split after the "
        "first)",
    )
    parser.add_argument("--reward", default="choice", help="`choice` (option letter), `exact`, or module:function")
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    parser.add_argument(
        "--arms",
        nargs="+",
        default=None,
        choices=list(ARMS),
        help="only these arms of the chosen tables (MoE-GRPO, the reference of every comparison, always runs)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--router-learning-rate", type=float, default=3e-3)
    parser.add_argument("--num-train", type=int, default=2048, help="rows of the generated visual_mc train split")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="visual_mc tasks of train, test and test_shifted (default: the six one-letter tasks); with the reasoning "
        "task `tally`, use a model that writes its format (bundled/tiny-internvl-moe-reason) and "
        "--max-completion-length 64",
    )
    parser.add_argument("--num-test", type=int, default=512, help="rows scored per test split")
    parser.add_argument("--output", default="docs/results.md", help="the report (Markdown); results JSON beside it")
    parser.add_argument("--smoke", action="store_true", help="2 steps per arm, one seed, 16 rows per test split")
    return parser


# ---------------------------------------------------------------------------------------------------- data, reward


def resolve_splits(args: argparse.Namespace) -> None:
    """Fill in the default test and generalization splits; refuse a generalization split that is not scored."""
    if args.test_splits is None:
        args.test_splits = ["test", "test_shifted", "test_heldout_tasks"] if args.dataset == "visual_mc" else ["test"]
    if args.generalization_splits is None:
        args.generalization_splits = args.test_splits[1:]
    unknown = [split for split in args.generalization_splits if split not in args.test_splits]
    if unknown:
        raise SystemExit(f"--generalization-splits {unknown} are not among --test-splits {args.test_splits}.")


def load_splits(args: argparse.Namespace):
    """The training split and the first `--num-test` rows of every test split, by name."""
    if args.dataset == "visual_mc":  # the demo's generated data, drawn here rather than read from a folder
        from trl_moe_grpo.demo.visual_mc import TASKS, visual_mc_dataset

        splits = visual_mc_dataset(args.num_train, args.num_test, seed=0, tasks=tuple(args.tasks or TASKS))
        train, tests = splits["train"], {split: splits[split] for split in args.test_splits}
    else:
        from trl_moe_grpo.loading import load_dataset_split

        train = load_dataset_split(args.dataset, args.train_split)
        tests = {split: load_dataset_split(args.dataset, split) for split in args.test_splits}
    return train, {split: [test[i] for i in range(min(args.num_test, len(test)))] for split, test in tests.items()}


def _completion_text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def exact_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion, case and surrounding punctuation aside, is the answer."""

    def normal(text: str) -> str:
        return re.sub(r"^\W+|\W+$", "", text.strip().lower())

    return [float(normal(_completion_text(c)) == normal(str(a))) for c, a in zip(completions, answer)]


def resolve_reward(name: str) -> Callable:
    if name == "choice":
        from trl_moe_grpo.demo.visual_mc import accuracy_reward

        return accuracy_reward
    if name == "exact":
        return exact_reward
    module, _, function = name.partition(":")
    import importlib

    return getattr(importlib.import_module(module), function)


# ---------------------------------------------------------------------------------------------------- one run


def load_model(name_or_path: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(name_or_path)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(name_or_path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(name_or_path)
    getattr(processor, "tokenizer", processor).padding_side = "left"
    return model, processor


def router_weights(controller) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in controller.router_parameters()])


def measure(
    model,
    processor,
    splits: dict[str, list[dict]],
    reward: Callable,
    max_new_tokens: int,
    name: str,
    figures: Path | None,
    generalization_splits: list[str],
) -> dict[str, Any]:
    """Accuracy per task of every test split (greedy, stock top-K), the generalization average (mean overall accuracy
    of `generalization_splits`), and the routing analysis of the first (in-distribution) split's prompts; with
    `figures`, the expert utilization per task and one example's routing probabilities are drawn there."""
    from trl_moe_grpo.analysis.accuracy import evaluate_accuracy
    from trl_moe_grpo.analysis.routing import (
        analyze_routing,
        plot_expert_utilization_by_task,
        plot_routing_probabilities,
    )
    from trl_moe_grpo.routing import RoutingController

    split_accuracy = {
        split: evaluate_accuracy(model, processor, rows, reward, batch_size=64, max_new_tokens=max_new_tokens)
        for split, rows in splits.items()
    }
    rows = next(iter(splits.values()))
    controller = RoutingController(model)
    try:
        analysis = analyze_routing(model, controller, processor, rows, batch_size=64, name=name)
    finally:
        controller.remove()
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        plot_expert_utilization_by_task(analysis, figures / f"{name}_expert_utilization_by_task.png")
        plot_routing_probabilities(analysis, figures / f"{name}_routing_probabilities.png")
    generalization = [split_accuracy[split]["all"] for split in generalization_splits]
    return {
        "accuracy": next(iter(split_accuracy.values())),  # in-distribution
        "split_accuracy": split_accuracy,
        "generalization": statistics.fmean(generalization) if generalization else None,
        "routing": analysis.summary(),
    }


def train_arm(
    arm: Arm,
    seed: int,
    args: argparse.Namespace,
    train,
    splits: dict[str, list[dict]],
    reward: Callable,
    figures: Path | None,
) -> dict:
    from trl_moe_grpo import MoEGRPOConfig, MoEGRPOTrainer, MoESFTConfig, MoESFTTrainer
    from trl_moe_grpo.data_utils import sft_rows_from_answers

    # Fine-tuning learns the reference completion: the whole worked solution where the data have one (visual_mc's
    # reasoning rows), else the answer.
    answer_column = "solution" if "solution" in (getattr(train, "column_names", None) or []) else "answer"

    model, processor = load_model(args.model)
    common = dict(
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        router_learning_rate=args.router_learning_rate,
        lr_scheduler_type="cosine",
        logging_steps=max(args.max_steps // 10, 1),
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        if arm.trainer == "grpo":
            options = dict(arm.options)
            group = options.pop("num_generations", args.num_generations)  # every arm sees the same prompts per step
            if options.get("router_warmup_steps") == "10%":
                options["router_warmup_steps"] = max(args.max_steps // 10, 1)
            config = MoEGRPOConfig(
                output_dir=output_dir,
                per_device_train_batch_size=args.prompts_per_step * group,
                num_generations=group,
                max_completion_length=args.max_completion_length,
                modality_calibration_samples=128,
                **common,
                **options,
            )
            trainer = MoEGRPOTrainer(
                model, reward_funcs=[reward], args=config, train_dataset=train, processing_class=processor
            )
        else:
            config = MoESFTConfig(
                output_dir=output_dir, per_device_train_batch_size=args.prompts_per_step, **common, **arm.options
            )
            trainer = MoESFTTrainer(
                model,
                args=config,
                train_dataset=sft_rows_from_answers(train, answer_column),
                processing_class=processor,
            )
        before = router_weights(trainer.routing)
        trainer.train()
        moved = float((router_weights(trainer.routing) - before).norm() / before.norm())
        trainer.routing.remove()
        # RL arms: the share of prompt groups whose rollouts disagreed in reward (the only ones that carry a signal).
        zero_std = [log["frac_reward_zero_std"] for log in trainer.state.log_history if "frac_reward_zero_std" in log]
        signal = 1 - statistics.fmean(zero_std) if zero_std else None
    train_seconds = time.perf_counter() - start
    result = measure(
        model, processor, splits, reward, args.max_completion_length, arm.name, figures, args.generalization_splits
    )
    seconds = time.perf_counter() - start
    return {
        **result,
        "router_weight_change": moved,
        "groups_with_signal": signal,
        "train_seconds": train_seconds,
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------------- statistics


# `stats.py` (next to this script): mean ± std over seeds, paired differences ± SE, their verdicts; one seed has
# neither an std nor an SE (n/a, no verdict).


# ---------------------------------------------------------------------------------------------------- report


def render(results: dict, settings: dict, args: argparse.Namespace, wall_seconds: float) -> str:
    runs = results["runs"]
    base = results["base"]
    seeds = args.seeds
    splits = list(settings["test_splits"])
    in_distribution, general = splits[0], list(settings["generalization_splits"])

    def accuracies(arm: str, split: str = in_distribution, task: str = "all") -> list[float]:
        return [runs[f"{arm}/{seed}"]["split_accuracy"][split][task] for seed in seeds]

    def generalization(arm: str) -> list[float]:
        return [runs[f"{arm}/{seed}"]["generalization"] for seed in seeds]

    n_test = settings["num_test"]
    p = base["accuracy"]["all"]
    headline = (
        f"The headline column, **generalization**, is the mean of the overall accuracies on {' and '.join(general)} "
        f"(each split weighs the same); {in_distribution} (in-distribution) is its own column."
        if general
        else f"With one test split there is no generalization average: {in_distribution} is the headline."
    )
    lines = [
        "# Miniature paper tables",
        "",
        f"Generated by `{settings['command']}` on {settings['machine']}, in {wall_seconds / 60:.1f} minutes "
        f"({', '.join(f'{k} {v}' for k, v in settings['versions'].items())}).",
        "",
        f"Model `{settings['model']}`, dataset `{settings['dataset']}`; {settings['max_steps']} steps per arm, "
        f"{settings['prompts_per_step']} prompts per step (G={settings['num_generations']} rollouts each for the RL "
        f"arms), learning rate {settings['learning_rate']} (routers {settings['router_learning_rate']}), cosine; "
        f"seeds {seeds}. Accuracy on up to {n_test} rows of each test split ({', '.join(splits)}), greedy decoding "
        f"with the stock top-K routing. {headline} The sampling error of one accuracy on {n_test} rows is about "
        f"{math.sqrt(p * (1 - p) / n_test):.3f}; the spread across seeds is the std below. A difference counts only "
        "where it exceeds twice its standard error (paired by seed); with one seed there is neither an std nor a "
        "standard error (n/a) and no verdict.",
        "",
    ]
    if settings["dataset"] == "visual_mc":
        described = {
            "test": "`test`, held-out rows of the training tasks",
            "test_shifted": "`test_shifted`, the same rows drawn in image styles never trained on (other backgrounds, "
            "ink colours, object sizes, outlined shapes, pixel noise)",
            "test_heldout_tasks": "`test_heldout_tasks`, task compositions never trained on (`find_square`, "
            "`video_colour`, `count_circles`)",
        }
        scored = "; ".join(described[split] for split in splits if split in described)
        lines += [f"Splits: {scored}. No evaluation row repeats a training row.", ""]
    sensitivity = base["route_sensitivity"]
    lines += [
        "Before training: "
        + "; ".join(f"{split} {base['split_accuracy'][split]['all']:.3f}" for split in splits)
        + (f"; generalization {base['generalization']:.3f}." if general else ".")
        + f" Route sensitivity (the share of prompts whose G={settings['num_generations']} sampled-routing greedy "
        "rollouts disagree in reward, the groups that give MoE-GRPO a signal): "
        + "; ".join(f"{split} {sensitivity[split]['route_sensitivity']:.3f}" for split in splits)
        + ".",
        "",
    ]
    # The reading of the numbers is written by hand, in a file beside the report that a re-run keeps.
    findings = Path(args.output).with_name(Path(args.output).stem + "-findings.md")
    if findings.is_file():
        lines += [
            f"## Findings (written by hand from this run: `{findings.name}`)",
            "",
            findings.read_text().strip(),
            "",
        ]
    shown = [arm for arm in ARMS if all(f"{arm}/{seed}" in runs for seed in seeds)]  # trained on every seed
    split_header = " | ".join(splits)
    for table in args.tables:
        title, arms, paper = TABLES[table]
        arms = [arm for arm in arms if arm in shown]
        first = "generalization (mean ± std)" if general else f"{in_distribution} (mean ± std)"
        gaps = "vs MoE-GRPO, generalization (± SE) | " if general else ""
        lines += [
            f"## {title}",
            "",
            f"| method | {first} | {split_header} | {gaps}vs MoE-GRPO, {in_distribution} (± SE) | paper |",
        ]
        lines.append("|" + " --- |" * (len(splits) + 4 + bool(general)))
        for arm in arms:
            headline_values = generalization(arm) if general else accuracies(arm)
            mean, std = mean_std(headline_values)
            per_split = " | ".join(f"{statistics.fmean(accuracies(arm, split)):.3f}" for split in splits)
            cells = []
            for scores in [generalization] * bool(general) + [accuracies]:
                if arm == "moe_grpo":
                    cells.append("—")
                else:
                    difference = paired_difference(scores(arm), scores("moe_grpo"))
                    cells.append(f"{mean_pm(difference.mean, difference.se, 3, sign=True)}: {difference.verdict}")
            paper_value = paper.get(arm)
            paper_cell = "" if paper_value is None else f"{paper_value:g}"
            lines.append(
                f"| {ARMS[arm].label} | {mean_pm(mean, std, 3)} | {per_split} | {' | '.join(cells)} | {paper_cell} |"
            )
        lines += ["", f"({PAPER_NOTES[table]})", ""]

    lines += ["## Accuracy per task", "", "Mean over seeds, per test split.", ""]
    for split in splits:
        tasks = [task for task in base["split_accuracy"][split] if task != "all"]
        lines += [f"### {split}", "", f"| method | all | {' | '.join(tasks)} |", "|" + " --- |" * (len(tasks) + 2)]
        before = base["split_accuracy"][split]
        lines.append(
            f"| before training | {before['all']:.3f} | " + " | ".join(f"{before[t]:.3f}" for t in tasks) + " |"
        )
        for arm in shown:
            cells = [statistics.fmean(accuracies(arm, split, task)) for task in ["all", *tasks]]
            lines.append(f"| {ARMS[arm].label} | " + " | ".join(f"{value:.3f}" for value in cells) + " |")
        lines.append("")

    lines += [
        "## Routing analysis (in-distribution test prompts, stock top-K)",
        "",
        "Mean over seeds and MoE layers, in nats. Gate entropy: mean entropy of each token's gate distribution (what "
        "the trainer logs as `routing/entropy`). Sequence routing entropy: the entropy of the expert-selection "
        "frequencies over one prompt's tokens, averaged over prompts (the paper's measure, on prompts of tens of "
        "tokens, not 2K); pooled: the same over all held-out tokens. Task JSD: Jensen-Shannon divergence between "
        "the tasks' expert-selection distributions, mean over task pairs. Router change: relative norm of the "
        "router weights' change. Signal: for the RL arms, the share of prompt groups whose G rollouts did not all get "
        "the same reward, averaged over logged steps (only those groups carry a gradient). Figures: "
        "`expert_utilization_by_task` and `routing_probabilities` PNGs in the folder beside this report, before "
        "training and after Det-FT and MoE-GRPO (first seed).",
        "",
        "| method | gate entropy | sequence routing entropy | pooled | task JSD | router change | signal |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    b = base["routing"]
    lines.append(
        f"| before training | {b['mean_gate_entropy']:.3f} | {b['sequence_routing_entropy']:.3f} | "
        f"{b['pooled_routing_entropy']:.3f} | {_fmt(b['task_jsd'])} | — | — |"
    )
    for arm in shown:
        stats = [runs[f"{arm}/{seed}"] for seed in seeds]

        def avg(key: str, stats=stats) -> float | None:
            values = [s["routing"][key] for s in stats if s["routing"][key] is not None]
            return statistics.fmean(values) if values else None

        change = statistics.fmean(s["router_weight_change"] for s in stats)
        signals = [s.get("groups_with_signal") for s in stats]
        signal = statistics.fmean(signals) if None not in signals else None
        lines.append(
            f"| {ARMS[arm].label} | {avg('mean_gate_entropy'):.3f} | {avg('sequence_routing_entropy'):.3f} | "
            f"{avg('pooled_routing_entropy'):.3f} | {_fmt(avg('task_jsd'))} | {change:.3f} | {_fmt(signal)} |"
        )
    lines += ["", f"({PAPER_ANALYSIS})", "", "## Time per arm", ""]
    lines += ["| method | training s per run | with evaluation |", "| --- | --- | --- |"]
    for arm in shown:
        train = statistics.fmean(runs[f"{arm}/{seed}"]["train_seconds"] for seed in seeds)
        total = statistics.fmean(runs[f"{arm}/{seed}"]["seconds"] for seed in seeds)
        lines.append(f"| {ARMS[arm].label} | {train:.0f} | {total:.0f} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    import sys

    import accelerate
    import transformers
    import trl

    args = make_parser().parse_args(argv)
    resolve_splits(args)
    if args.smoke:
        args.max_steps, args.seeds, args.num_test, args.num_train = 2, args.seeds[:1], 16, 64
    output = Path(args.output)
    results_path = output.with_suffix(".json")
    settings = {
        key: getattr(args, key)
        for key in (
            "model", "dataset", "train_split", "test_splits", "generalization_splits", "reward", "max_steps",
            "prompts_per_step", "num_generations", "max_completion_length", "learning_rate", "router_learning_rate",
            "num_train", "num_test", "tasks",
        )
    }  # fmt: skip
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "runs": {}}
    figures = output.parent / output.stem  # docs/results/ for docs/results.md
    reward = resolve_reward(args.reward)
    train, splits = load_splits(args)

    if "base" not in results:
        from route_sensitivity import route_sensitivity  # benchmarks/, beside this script

        model, processor = load_model(args.model)
        results["base"] = measure(
            model, processor, splits, reward, args.max_completion_length, "before", figures, args.generalization_splits
        )
        # Before training: how often routing alone changes the reward of a prompt's G rollouts (MoE-GRPO's signal).
        results["base"]["route_sensitivity"] = {
            split: route_sensitivity(model, processor, rows, reward, args.num_generations, args.max_completion_length)
            for split, rows in splits.items()
        }
    arms = list(dict.fromkeys(arm for table in args.tables for arm in TABLES[table][1]))
    if args.arms:
        arms = [arm for arm in arms if arm in args.arms or arm == "moe_grpo"]
    for arm in arms:
        for seed in args.seeds:
            key = f"{arm}/{seed}"
            if key in results["runs"]:
                continue
            print(f"== {key}", flush=True)
            # Figures of the routing before training, after Det-FT and after MoE-GRPO (first seed).
            drawn = figures if seed == args.seeds[0] and arm in FIGURE_ARMS else None
            results["runs"][key] = train_arm(ARMS[arm], seed, args, train, splits, reward, drawn)
            accuracies = results["runs"][key]["split_accuracy"]
            print(f"== {key}: " + ", ".join(f"{s} {a['all']:.3f}" for s, a in accuracies.items()), flush=True)
            output.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1))
    # Summed per run, so that a resumed run reports the whole cost.
    wall = sum(results["runs"][f"{arm}/{seed}"]["seconds"] for arm in arms for seed in args.seeds)

    info = {
        "command": " ".join(["python benchmarks/paper_tables.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.python_version()}",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "accelerate": accelerate.__version__,
        },
        **settings,
    }
    report = render(results, info, args, wall)
    output.write_text(report)
    print(report)
    return results


if __name__ == "__main__":
    main()
