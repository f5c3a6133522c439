"""The end-of-run report of a recipe: held-out accuracy, routing entropy, reward curve and expert utilization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .evaluation import evaluate_accuracy
from .routing import RoutingController
from .routing_analysis import analyze_routing


def measure(
    model: torch.nn.Module,
    controller: RoutingController,
    processing_class,
    rows: list[dict],
    reward_fn,
    batch_size: int,
) -> dict[str, Any]:
    """Accuracy per task (greedy, top-K), the routing measures of `routing_analysis` and the expert load per layer on
    `rows`."""
    analysis = analyze_routing(model, controller, processing_class, rows, batch_size)
    load = analysis.counts.sum(0).float()  # [layers, experts]
    return {
        "accuracy": evaluate_accuracy(model, processing_class, rows, reward_fn, batch_size),
        "routing": analysis.summary(),
        "expert_share": (load / load.sum(-1, keepdim=True)).tolist(),
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reward_curve(log_history: list[dict], path: Path) -> Path:
    """Mean reward per logged step, with the within-group reward std (the GRPO learning signal)."""
    plt = _pyplot()
    steps = [log["step"] for log in log_history if "reward" in log]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [log["reward"] for log in log_history if "reward" in log], marker="o", label="mean reward")
    within = [log.get("reward_std_within_group") for log in log_history if "reward" in log]
    if all(value is not None for value in within):
        ax.plot(steps, within, linestyle="--", label="reward std within groups")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("MoE-GRPO training reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_expert_utilization(before: list[list[float]], after: list[list[float]], path: Path) -> Path:
    """Share of routed slots per expert and layer on held-out prompts, before and after training."""
    plt = _pyplot()
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(before: dict, after: dict, log_history: list[dict], output_dir: str | Path) -> dict[str, Any]:
    """Write `report.json`, `reward_curve.png` and `expert_utilization.png`; return the report."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "held_out_accuracy": {"before": before["accuracy"], "after": after["accuracy"]},
        "routing": {"before": before["routing"], "after": after["routing"]},
        "expert_share": {"before": before["expert_share"], "after": after["expert_share"]},
        "rewards": [{"step": log["step"], "reward": log["reward"]} for log in log_history if "reward" in log],
        "files": {
            "reward_curve": str(plot_reward_curve(log_history, output_dir / "reward_curve.png")),
            "expert_utilization": str(
                plot_expert_utilization(
                    before["expert_share"], after["expert_share"], output_dir / "expert_utilization.png"
                )
            ),
        },
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def format_report(report: dict[str, Any]) -> str:
    """A short text summary: accuracy per task and routing entropy, before -> after."""
    lines = ["held-out accuracy (greedy, top-K routing)       before   after"]
    accuracy = report["held_out_accuracy"]
    for task in accuracy["before"]:
        lines.append(f"  {task:<44} {accuracy['before'][task]:6.3f}  {accuracy['after'][task]:6.3f}")
    before, after = report["routing"]["before"], report["routing"]["after"]
    rows = {
        "mean gate entropy (nats, per token)": "mean_gate_entropy",
        "sequence routing entropy (nats, per prompt)": "sequence_routing_entropy",
        "task-wise JSD of expert selections (nats)": "task_jsd",
    }
    for label, key in rows.items():
        if before[key] is not None and after[key] is not None:
            lines.append(f"{label:<47} {before[key]:6.3f}  {after[key]:6.3f}")
    lines.append(f"files: {report['files']['reward_curve']}, {report['files']['expert_utilization']}")
    return "\n".join(lines)
