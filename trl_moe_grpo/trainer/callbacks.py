"""The before/after report of a training run, from the trainer's own evaluations: `MoEReportCallback`.

The callback has the trainer evaluate at the start (`eval_on_start`) and at the last step, then writes `report.json`
(held-out reward per task, routing measures, expert shares, the training reward curve) and, with matplotlib (the
`plots` extra), `reward_curve.png` and `expert_utilization.png` to `output_dir`, and prints a short table. Every
number in it is a metric `trainer.evaluate()` logged (so it also reaches `report_to`) or the routing measures of that
evaluation (`MoEGRPOTrainer.last_eval_routing`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from ..analysis.plots import has_matplotlib, pyplot, save_figure
from ..errors import MoEGRPOError

logger = logging.get_logger(__name__)


NO_STEP_LOGGED = "no training step was logged"


def no_step_logged_note(max_steps: int, logging_steps: float) -> str:
    """Why a run has no reward curve, with the fix."""
    if logging_steps >= 1 and max_steps < logging_steps:
        return (
            f"{NO_STEP_LOGGED} (max_steps={max_steps} < logging_steps={logging_steps:g}): lower `logging_steps` "
            "to draw the reward curve"
        )
    return f"{NO_STEP_LOGGED} (check `logging_strategy` and `logging_steps`)"


def plot_reward_curve(log_history: list[dict], path: Path, note: str = NO_STEP_LOGGED) -> Path:
    """Mean reward per logged step, with the within-group reward std (the GRPO learning signal).

    With no logged step the figure says so (`note`) instead of drawing empty axes.
    """
    plt = pyplot()
    steps = [log["step"] for log in log_history if "reward" in log]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if not steps:
        ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title("MoE-GRPO training reward")
        return save_figure(fig, path, dpi=120)
    ax.plot(steps, [log["reward"] for log in log_history if "reward" in log], marker="o", label="mean reward")
    within = [log.get("reward_std_within_group") for log in log_history if "reward" in log]
    if all(value is not None for value in within):
        ax.plot(steps, within, linestyle="--", label="reward std within groups")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("MoE-GRPO training reward")
    ax.legend()
    return save_figure(fig, path, dpi=120)


def plot_expert_utilization(before: list[list[float]], after: list[list[float]], path: Path) -> Path:
    """Share of routed slots per expert and layer on held-out prompts, before and after training."""
    plt = pyplot()
    before_t, after_t = torch.tensor(before), torch.tensor(after)
    num_layers, num_experts = before_t.shape
    fig, axes = plt.subplots(num_layers, 1, figsize=(6, 2.2 * num_layers), squeeze=False)
    width = 0.4
    for layer, ax in enumerate(axes[:, 0]):
        positions = torch.arange(num_experts)
        ax.bar(positions - width / 2, before_t[layer], width, label="before")
        ax.bar(positions + width / 2, after_t[layer], width, label="after")
        ax.axhline(1 / num_experts, color="gray", linewidth=0.8, linestyle=":")
        ax.set_ylabel(f"layer {layer}")
        ax.set_xticks(positions.tolist())
    axes[0, 0].set_title("share of top-K slots per expert (held-out prompts)")
    axes[0, 0].legend()
    axes[-1, 0].set_xlabel("expert")
    return save_figure(fig, path, dpi=120)


class MoEReportCallback(TrainerCallback):
    """Evaluate before and after training and write the report (`report.json`, figures, a printed table).

    Like TRL's `LogCompletionsCallback`, it is built with the trainer (an `MoEGRPOTrainer` with an `eval_dataset`):
    `trainer.add_callback(MoEReportCallback(trainer))`. It turns on the trainer's `eval_on_start` (the "before"
    evaluation) and asks for an evaluation at the last step (the "after" one), whatever `eval_strategy` says.
    """

    def __init__(self, trainer):
        if trainer.eval_dataset is None:
            raise MoEGRPOError("The report evaluates before and after training: give the trainer an `eval_dataset`.")
        trainer.args.eval_on_start = True
        self.trainer = trainer
        self.evaluations: list[dict[str, Any]] = []
        self.report: dict[str, Any] | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        evaluation = {"step": state.global_step, "metrics": dict(metrics or {})}
        evaluation["routing"] = self.trainer.last_eval_routing
        self.evaluations.append(evaluation)

    def on_train_end(self, args, state, control, **kwargs):
        if len(self.evaluations) < 2:
            logger.warning("No report: training ended before the final evaluation ran.")
            return
        if state.is_world_process_zero:
            self.report = write_report(
                self.evaluations[0],
                self.evaluations[-1],
                state.log_history,
                args.output_dir,
                no_step_note=no_step_logged_note(state.max_steps, args.logging_steps),
            )
            print(format_report(self.report))


def held_out_rewards(metrics: dict[str, float], prefix: str = "eval") -> dict[str, float]:
    """`{"all": mean reward, task: mean reward, ...}` from an evaluation's logged metrics."""
    rewards = {"all": metrics[f"{prefix}_reward"]}
    marker = f"{prefix}_reward_by_task/"
    rewards.update({key[len(marker) :]: value for key, value in metrics.items() if key.startswith(marker)})
    return rewards


def expert_shares(counts: torch.Tensor) -> list[list[float]]:
    """`[layers][experts]` share of the routed slots per expert, from `[sequences, layers, experts]` counts."""
    load = counts.sum(0).double()
    return (load / load.sum(-1, keepdim=True).clamp(min=1)).tolist()


def write_report(
    before: dict, after: dict, log_history: list[dict], output_dir: str | Path, no_step_note: str = NO_STEP_LOGGED
) -> dict[str, Any]:
    """Write `report.json` (and the figures, with matplotlib) from two evaluations; return the report.

    When no training step was logged, `no_step_note` (why, and the fix) goes into the report as `rewards_note`, the
    log and the reward-curve figure, which is still written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    evaluations = {"before": before, "after": after}
    shares = {key: expert_shares(value["routing"].counts) for key, value in evaluations.items()}
    report = {
        "steps": {"before": before["step"], "after": after["step"]},
        "held_out_reward": {key: held_out_rewards(value["metrics"]) for key, value in evaluations.items()},
        "routing": {key: value["routing"].summary() for key, value in evaluations.items()},
        "expert_share": shares,
        "rewards": [{"step": log["step"], "reward": log["reward"]} for log in log_history if "reward" in log],
        "files": {"reward_curve": None, "expert_utilization": None},
    }
    if not report["rewards"]:
        report["rewards_note"] = no_step_note
        logger.warning(f"The report has no reward curve: {no_step_note}.")
    if has_matplotlib():
        report["files"] = {
            "reward_curve": str(plot_reward_curve(log_history, output_dir / "reward_curve.png", no_step_note)),
            "expert_utilization": str(
                plot_expert_utilization(shares["before"], shares["after"], output_dir / "expert_utilization.png")
            ),
        }
    else:
        logger.warning("No figures: matplotlib is not installed (`pip install 'trl-moe-grpo[plots]'`).")
    (output_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def format_report(report: dict[str, Any]) -> str:
    """A short text summary: held-out reward per task and routing entropy, before -> after."""
    lines = ["held-out reward (evaluation: top-K routing)      before   after"]
    rewards = report["held_out_reward"]
    for task in rewards["before"]:
        lines.append(f"  {task:<44} {rewards['before'][task]:6.3f}  {rewards['after'].get(task, float('nan')):6.3f}")
    before, after = report["routing"]["before"], report["routing"]["after"]
    rows = {
        "mean gate entropy (nats, per token)": "mean_gate_entropy",
        "sequence routing entropy (nats, per sequence)": "sequence_routing_entropy",
        "task-wise JSD of expert selections (nats)": "task_jsd",
    }
    for label, key in rows.items():
        if before[key] is not None and after[key] is not None:
            lines.append(f"{label:<47} {before[key]:6.3f}  {after[key]:6.3f}")
    if report.get("rewards_note"):
        lines.append(f"training reward: {report['rewards_note']}")
    files = [path for path in report["files"].values() if path]
    if files:
        lines.append(f"files: {', '.join(files)}")
    return "\n".join(lines)
