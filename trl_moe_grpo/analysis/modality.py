"""Routing analysis: tables and plots of modality statistics."""

from __future__ import annotations

from pathlib import Path

from ..guidance import VISION, ModalityStatistics
from .plots import pyplot, save_figure


def modality_table(stats: ModalityStatistics, mask_ratio: float) -> str:
    """The vision score `ŝ_v` per layer and expert as text; `*` marks experts masked for vision, `t` for text."""
    scores, masks = stats.scores(), stats.masks(mask_ratio)
    num_experts = scores.shape[-1]
    lines = [
        f"ŝ_v per layer and expert (P={mask_ratio}; * masked for vision tokens, t masked for text tokens)",
        "layer " + " ".join(f"{e:>7}" for e in range(num_experts)),
    ]
    for layer in range(scores.shape[0]):
        cells = []
        for e in range(num_experts):
            mark = ("*" if not masks[layer, VISION, e] else "") + ("t" if not masks[layer, 0, e] else "")
            cells.append(f"{scores[layer, VISION, e].item():.3f}{mark:<2}".rjust(7))
        lines.append(f"{layer:>5} " + " ".join(cells))
    return "\n".join(lines)


def plot_modality_scores(stats: ModalityStatistics, mask_ratio: float, path: str | Path) -> Path:
    """Draw `ŝ_v` as a layer x expert heatmap and mark the masked experts; save it to `path` (PNG)."""
    plt = pyplot()
    scores, masks = stats.scores(), stats.masks(mask_ratio)
    num_layers, num_experts = scores.shape[0], scores.shape[-1]
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * num_experts, 1.0 + 0.35 * num_layers))
    image = ax.imshow(scores[:, VISION].numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for layer in range(num_layers):
        for expert in range(num_experts):
            marks = ("V" if not masks[layer, VISION, expert] else "") + ("T" if not masks[layer, 0, expert] else "")
            if marks:
                ax.text(expert, layer, marks, ha="center", va="center", color="red", fontsize=8, fontweight="bold")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_layers))
    ax.set_title(f"vision score ŝ_v (V/T: masked for vision/text, P={mask_ratio})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(fig, path, dpi=120)
