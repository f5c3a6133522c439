"""Routing analysis of MoE models (the paper's routing figures): entropies, task-wise divergence and plots.

Two entropies answer different questions and are kept apart by name:

- **sequence routing entropy**: per layer, count how often each expert is in the top-K over a sequence's tokens,
  normalize the counts to a distribution and take its entropy. High when the sequence spreads its tokens over many
  experts; it says nothing about how sure each single routing decision was. It is bounded by
  `ln min(N, K * tokens)`, so compare models on the same prompts. The *pooled* version counts over every token of the
  data set at once.
- **mean gate entropy**: the entropy of each token's gate distribution (the router's softmax, or the family's
  selection distribution, see `routing/adapters.py`), averaged over tokens. Its mean over layers is what
  `MoEGRPOTrainer` logs as `routing/entropy` on training batches.

The **task-wise Jensen-Shannon divergence** compares, per layer, the distributions of top-K selections of the tokens
of each task: 0 when all tasks use the experts alike, up to `ln 2` when they use disjoint experts.

Every logarithm is natural: entropies and divergences are in nats. Routing is the routers' stock top-K (what
inference does); padding never counts. The measures are pure functions on tensors; `analyze_routing` runs a model on
dataset rows and returns a `RoutingAnalysis`; the `plot_*` functions draw its figures (matplotlib is imported inside
them, so this module imports without it).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data_utils import calibration_batches
from ..errors import MoEGRPOError
from ..routing.controller import RoutingController
from ..routing.introspection import model_identity
from .measures import (  # noqa: F401  (the measures' public names, kept importable from here)
    MODALITIES,
    entropy,
    expert_distributions_by_task,
    in_bits,
    jensen_shannon,
    mean_entropy_of_nonempty,
    mean_gate_entropy,
    mean_pairwise_jsd,
    modality_token_mask,
    pairwise_jsd,
    pooled_routing_entropy,
    selection_counts,
    sequence_routing_entropy,
    task_jsd_of_nonempty,
)
from .plots import pyplot, save_figure

FORMAT = "trl-moe-grpo/routing-analysis"
FORMAT_VERSION = 1
ALL_TASKS = "all"  # the one task of rows without a task column

# ---------------------------------------------------------------------------------------------------- collecting


@dataclass
class RoutingBatch:
    """The stock top-K routing of one batch of prompts.

    Attributes:
        input_ids: `[batch, tokens]`.
        attention_mask: `[batch, tokens]`, 0 for padding.
        routes: `[batch, tokens, layers, top_k]` int64, the experts each token was sent to (in the router's order).
        gate_probs: `[batch, tokens, layers, experts]` float32, each token's gate (selection) distribution.
        tasks: the task of each row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    routes: torch.Tensor
    gate_probs: torch.Tensor
    tasks: list[str]

    def sequence(self, row: int) -> SequenceRouting:
        """Row `row` with its padding removed."""
        keep = self.attention_mask[row].bool()
        return SequenceRouting(
            self.input_ids[row][keep], self.routes[row][keep], self.gate_probs[row][keep], self.tasks[row]
        )


@dataclass
class SequenceRouting:
    """One prompt's routing, padding removed: `input_ids` `[tokens]`, `routes` `[tokens, layers, top_k]`,
    `gate_probs` `[tokens, layers, experts]`, its `task`, and (for figures) its `tokens` as text."""

    input_ids: torch.Tensor
    routes: torch.Tensor
    gate_probs: torch.Tensor
    task: str
    tokens: list[str] = field(default_factory=list)


def row_task(row: dict[str, Any], task_column: str | None) -> str:
    """The task name of a dataset row: its `task_column` value, or `"all"` without such a column."""
    if task_column is None or row.get(task_column) is None:
        return ALL_TASKS
    return str(row[task_column])


@torch.no_grad()
def collect_routing(
    model: torch.nn.Module,
    controller: RoutingController,
    processing_class,
    rows: list[dict[str, Any]],
    batch_size: int = 8,
    task_column: str | None = "task",
) -> Iterator[RoutingBatch]:
    """Run `model` on the prompts of `rows` with stock top-K routing; yield each batch's routes and gate probabilities.

    Prompts are built as TRL builds generation prompts (`prompts.calibration_batches`: chat template, images).
    The controller only records (`RoutingController.capture`): the model routes exactly as without it.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        batches = calibration_batches(processing_class, rows, batch_size, device)
        for start, inputs in zip(range(0, len(rows), batch_size), batches):
            input_ids = inputs["input_ids"]
            attention_mask = inputs.get("attention_mask", torch.ones_like(input_ids))
            with controller.capture() as recording:
                model(**inputs)
            (routes,), (gate_probs,) = recording.steps, recording.selection_probs
            yield RoutingBatch(
                input_ids=input_ids.cpu(),
                attention_mask=attention_mask.cpu(),
                routes=routes.long().cpu(),
                gate_probs=gate_probs.float().cpu(),
                tasks=[row_task(row, task_column) for row in rows[start : start + batch_size]],
            )
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------- the result


@dataclass
class RoutingAnalysis:
    """Routing statistics of one model on a set of prompts (stock top-K routing, padding excluded).

    Attributes:
        name: the model's label in tables and figures (e.g. its folder name).
        model: the model's identity (`architecture`, `num_layers`, `num_experts`, `top_k`, `router_layers`, ...).
        counts: `[sequences, layers, experts]` int64, how often each expert was in the top-K of each prompt's tokens.
        tasks: the task of each prompt (`"all"` for every prompt when the rows have no task column).
        gate_entropy: `[layers]` mean gate entropy (nats) over every token.
        num_tokens: the tokens measured (padding excluded).
        task_column: the column the tasks came from; `None` when the rows had none.
        example: one prompt's full routing, for the token-level figures.
        modality_counts: `counts` restricted to the `"text"` and to the `"vision"` tokens (vision: the processor's
            image and video placeholders), when the modality of each token was known; empty otherwise.
        tokens: which tokens were counted: `"prompt"` (`analyze-routing`) or `"prompt and completion"` (a
            trainer's evaluation, over its generated sequences).
    """

    name: str
    model: dict[str, Any]
    counts: torch.Tensor
    tasks: list[str]
    gate_entropy: torch.Tensor
    num_tokens: int
    task_column: str | None = "task"
    example: SequenceRouting | None = None
    modality_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: str = "prompt"

    @property
    def num_experts(self) -> int:
        return self.counts.shape[-1]

    @property
    def num_layers(self) -> int:
        return self.counts.shape[-2]

    @property
    def sequence_entropy(self) -> torch.Tensor:
        """`[layers]` sequence routing entropy (nats), averaged over the prompts."""
        return entropy(self.counts).mean(0)

    @property
    def pooled_entropy(self) -> torch.Tensor:
        """`[layers]` routing entropy (nats) of the selection frequencies over all tokens of all prompts."""
        return entropy(self.counts.sum(0))

    @property
    def task_names(self) -> list[str]:
        return list(dict.fromkeys(self.tasks))

    @property
    def task_distributions(self) -> torch.Tensor:
        """`[tasks, layers, experts]`: each task's share of top-K selections per expert (tasks as `task_names`)."""
        return expert_distributions_by_task(self.counts, self.tasks, self.task_names)[1]

    @property
    def task_jsd(self) -> torch.Tensor | None:
        """`[layers]` mean task-wise JSD (nats) over task pairs; `None` with fewer than two tasks."""
        return mean_pairwise_jsd(self.task_distributions)

    @property
    def has_vision_tokens(self) -> bool:
        vision = self.modality_counts.get("vision")
        return vision is not None and bool(vision.sum() > 0)

    def modality_measures(self) -> dict[str, float | None]:
        """Sequence routing entropy and task-wise JSD (nats, and bits) of the text and of the vision tokens, each a
        mean over layers; empty unless the analysis has vision tokens (for text-only data they equal the totals)."""
        if not self.has_vision_tokens:
            return {}
        measures: dict[str, float | None] = {}
        for modality in MODALITIES:
            counts = self.modality_counts[modality]
            sequence = mean_entropy_of_nonempty(counts)
            jsd = task_jsd_of_nonempty(counts, self.tasks)
            measures[f"sequence_routing_entropy/{modality}"] = None if sequence is None else sequence.mean().item()
            measures[f"task_jsd/{modality}"] = None if jsd is None else jsd.mean().item()
            measures[f"task_jsd_bits/{modality}"] = None if jsd is None else in_bits(jsd.mean().item())
        return measures

    def summary(self) -> dict[str, float | None]:
        """The headline numbers, each a mean over layers; JSD in nats (`task_jsd`) and bits (`task_jsd_bits`)."""
        jsd = self.task_jsd
        return {
            "sequence_routing_entropy": self.sequence_entropy.mean().item(),
            "pooled_routing_entropy": self.pooled_entropy.mean().item(),
            "mean_gate_entropy": self.gate_entropy.double().mean().item(),
            "task_jsd": None if jsd is None else jsd.mean().item(),
            "task_jsd_bits": None if jsd is None else in_bits(jsd.mean().item()),
            **self.modality_measures(),
        }

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: the summary, per-layer values, per-task expert shares and the pairwise task JSD."""
        names, distributions, jsd = self.task_names, self.task_distributions, self.task_jsd
        router_names = self.model.get("router_layers") or [str(layer) for layer in range(self.num_layers)]
        layers = []
        for layer in range(self.num_layers):
            layers.append(
                {
                    "layer": layer,
                    "router": router_names[layer],
                    "sequence_routing_entropy": round(self.sequence_entropy[layer].item(), 6),
                    "pooled_routing_entropy": round(self.pooled_entropy[layer].item(), 6),
                    "mean_gate_entropy": round(self.gate_entropy[layer].item(), 6),
                    "task_jsd": None if jsd is None else round(jsd[layer].item(), 6),
                    "expert_share": {
                        name: [round(v, 6) for v in distributions[t, layer].tolist()] for t, name in enumerate(names)
                    },
                }
            )
        pairs = {}
        if len(names) > 1:
            matrix = pairwise_jsd(distributions).mean(-1)
            pairs = {
                f"{a} | {b}": round(matrix[i, j].item(), 6)
                for (i, a), (j, b) in itertools.combinations(enumerate(names), 2)
            }
        return {
            "name": self.name,
            "model": self.model,
            "num_sequences": int(self.counts.shape[0]),
            "num_tokens": self.num_tokens,
            "tokens": self.tokens,
            "num_tokens_by_modality": {
                modality: int(counts[:, 0].sum()) // max(int(self.model.get("top_k") or 1), 1)
                for modality, counts in self.modality_counts.items()
            },
            "task_column": self.task_column,
            "tasks": {name: self.tasks.count(name) for name in names},
            "max_entropy": math.log(self.num_experts),
            "summary": {k: None if v is None else round(v, 6) for k, v in self.summary().items()},
            "pairwise_task_jsd": pairs,
            "example": None
            if self.example is None
            else {"task": self.example.task, "num_tokens": len(self.example.input_ids)},
            "layers": layers,
        }


DEFINITIONS = {
    "units": "nats (natural logarithm); *_bits: the same in bits (divided by ln 2; the paper does not state its "
    "base); summary values are means over MoE layers",
    "tokens": "which tokens were counted: the prompts' (analyze-routing) or the prompts' and completions' (a "
    "trainer's evaluation); padding never",
    "*/text, */vision": "the same measure over only the text tokens, or only the vision tokens (image and video "
    "placeholders), of each sequence; sequences (and tasks) without such tokens are left out; present only when "
    "there are vision tokens",
    "sequence_routing_entropy": "per layer and prompt, entropy of the top-K expert-selection frequencies over the "
    "prompt's tokens; averaged over prompts",
    "pooled_routing_entropy": "per layer, entropy of the top-K expert-selection frequencies over all tokens",
    "mean_gate_entropy": "per layer, entropy of each token's gate distribution, averaged over tokens (the trainer's "
    "routing/entropy is its mean over layers)",
    "task_jsd": "per layer, Jensen-Shannon divergence between the tasks' top-K expert-selection distributions, "
    "averaged over task pairs; null with fewer than two tasks",
}


def analyze_routing(
    model: torch.nn.Module,
    controller: RoutingController,
    processing_class,
    rows: list[dict[str, Any]],
    batch_size: int = 8,
    task_column: str | None = "task",
    name: str = "model",
    example_index: int = 0,
) -> RoutingAnalysis:
    """Measure the routing of `model` on the prompts of `rows` (stock top-K, no gradients, padding excluded).

    Rows without `task_column` all count as one task, `"all"` (the task-wise JSD is then `None`). Row
    `example_index` is kept whole, with its tokens as text, for `plot_token_activations` and
    `plot_routing_probabilities`. Prompts with no token (empty after templating) are left out.
    """
    if not rows:
        raise MoEGRPOError("No rows to analyze: pass at least one dataset row.")
    if not 0 <= example_index < len(rows):
        raise MoEGRPOError(f"Example row {example_index} is out of range: {len(rows)} rows are analyzed.")
    if task_column is not None and not any(task_column in row for row in rows):
        task_column = None
    counts, tasks, gate_sum, num_tokens, example = [], [], 0.0, 0, None
    modality_counts: dict[str, list[torch.Tensor]] = {modality: [] for modality in MODALITIES}
    batches = collect_routing(model, controller, processing_class, rows, batch_size, task_column)
    for start, batch in zip(range(0, len(rows), batch_size), batches):
        tokens = int(batch.attention_mask.sum())
        gate_sum = gate_sum + mean_gate_entropy(batch.gate_probs, batch.attention_mask) * tokens
        num_tokens += tokens
        lengths = batch.attention_mask.sum(-1)
        counts.append(selection_counts(batch.routes, controller.num_experts, batch.attention_mask)[lengths > 0])
        token_modality = controller.token_modality(batch.input_ids)
        for modality in MODALITIES:
            mask = modality_token_mask(token_modality, modality, batch.attention_mask)
            modality_counts[modality].append(selection_counts(batch.routes, controller.num_experts, mask)[lengths > 0])
        tasks += [task for task, length in zip(batch.tasks, lengths.tolist()) if length > 0]
        if start <= example_index < start + batch_size:
            example = batch.sequence(example_index - start)
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            example.tokens = [tokenizer.decode([token]) for token in example.input_ids.tolist()]
    if num_tokens == 0:
        raise MoEGRPOError("The prompts have no tokens to analyze.")
    identity = model_identity(model, controller)
    return RoutingAnalysis(
        name=name,
        model=identity,
        counts=torch.cat(counts),
        tasks=tasks,
        gate_entropy=gate_sum / num_tokens,
        num_tokens=num_tokens,
        task_column=task_column,
        example=example,
        modality_counts={modality: torch.cat(parts) for modality, parts in modality_counts.items()},
        tokens="prompt",
    )


def save_routing_analyses(analyses: Sequence[RoutingAnalysis], path: str | Path, **info: Any) -> Path:
    """Write the analyses of one or more models to a JSON file; `info` (dataset, split, ...) goes in as it is."""
    data = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **info,
        "definitions": DEFINITIONS,
        "models": [analysis.to_json() for analysis in analyses],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def _cell(value: float | None, width: int) -> str:
    return (f"{value:.3f}" if value is not None else "n/a").rjust(width)


def format_routing_table(analyses: Sequence[RoutingAnalysis]) -> str:
    """The analyses side by side, one column per model: per-layer sequence routing entropy and the summary rows."""
    width = max(8, *(len(a.name) + 1 for a in analyses))
    label = 56
    header = "".ljust(label) + "".join(a.name.rjust(width) for a in analyses)
    shapes = sorted({(a.num_experts, a.model.get("top_k")) for a in analyses})
    experts = ", ".join(f"top-{k} of {n} experts, max entropy ln {n} = {math.log(n):.3f}" for n, k in shapes)
    counted = " / ".join(sorted({a.tokens for a in analyses}))
    lines = [f"routing of the {counted} tokens (stock top-K, nats unless bits; {experts})", header]
    for layer in range(max(a.num_layers for a in analyses)):
        values = [a.sequence_entropy[layer].item() if layer < a.num_layers else None for a in analyses]
        lines.append(
            f"  sequence routing entropy, layer {layer}".ljust(label) + "".join(_cell(v, width) for v in values)
        )
    summaries = [a.summary() for a in analyses]
    rows = [
        ("sequence routing entropy, mean over layers", "sequence_routing_entropy"),
        ("pooled routing entropy (all tokens), mean over layers", "pooled_routing_entropy"),
        ("mean gate entropy (per token), mean over layers", "mean_gate_entropy"),
        ("task-wise JSD (task pairs), mean over layers", "task_jsd"),
        ("  the same in bits", "task_jsd_bits"),
    ]
    if any(a.has_vision_tokens for a in analyses):
        for modality in MODALITIES:
            rows += [
                (f"  {modality} tokens: sequence routing entropy", f"sequence_routing_entropy/{modality}"),
                (f"  {modality} tokens: task-wise JSD (bits)", f"task_jsd_bits/{modality}"),
            ]
    for text, key in rows:
        lines.append(text.ljust(label) + "".join(_cell(s.get(key), width) for s in summaries))
    first = analyses[0]
    if first.task_jsd is None:
        reason = "the rows have no task column" if first.task_column is None else "the rows hold one task"
        lines.append(f"  (task-wise JSD n/a: {reason})")
    tasks = ", ".join(f"{name} {first.tasks.count(name)}" for name in first.task_names)
    tokens = ", ".join(str(a.num_tokens) for a in analyses)
    lines.append(f"{first.counts.shape[0]} prompts ({tasks}); tokens per model: {tokens}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- figures


def _as_list(analyses: RoutingAnalysis | Sequence[RoutingAnalysis]) -> list[RoutingAnalysis]:
    return [analyses] if isinstance(analyses, RoutingAnalysis) else list(analyses)


def spread_layers(num_layers: int, most: int) -> list[int]:
    """At most `most` layer indices spread evenly from the first to the last layer."""
    if num_layers <= most or most < 2:
        return list(range(min(num_layers, max(most, 1))))
    return sorted({round(i * (num_layers - 1) / (most - 1)) for i in range(most)})


def _need_example(analysis: RoutingAnalysis) -> SequenceRouting:
    if analysis.example is None:
        raise MoEGRPOError(f"The analysis of {analysis.name} kept no example prompt to draw.")
    return analysis.example


def plot_expert_utilization_by_task(
    analyses: RoutingAnalysis | Sequence[RoutingAnalysis], path: str | Path, layers: Sequence[int] | None = None
) -> Path:
    """Per layer, each task's share of top-K selections per expert as grouped bars; one column per model.

    `layers` defaults to at most four spread from first to last. The dotted line is the even share `1 / N`.
    """
    plt = pyplot()
    analyses = _as_list(analyses)
    chosen = [list(layers) if layers is not None else spread_layers(a.num_layers, 4) for a in analyses]
    num_rows = max(len(c) for c in chosen)
    most_experts = max(a.num_experts for a in analyses)
    fig, axes = plt.subplots(
        num_rows,
        len(analyses),
        figsize=(min(3.0 + 0.45 * most_experts, 16.0) * len(analyses), 2.3 * num_rows),
        squeeze=False,
    )
    for column, (analysis, its_layers) in enumerate(zip(analyses, chosen)):
        names, shares = analysis.task_names, analysis.task_distributions
        width = 0.8 / len(names)
        positions = torch.arange(analysis.num_experts, dtype=torch.float64)
        for row in range(num_rows):
            ax = axes[row, column]
            if row >= len(its_layers):
                ax.axis("off")
                continue
            layer = its_layers[row]
            for t, name in enumerate(names):
                offset = (t - (len(names) - 1) / 2) * width
                ax.bar((positions + offset).tolist(), shares[t, layer].tolist(), width, label=name)
            ax.axhline(1 / analysis.num_experts, color="gray", linewidth=0.8, linestyle=":")
            ax.set_ylabel(f"layer {layer}")
            if analysis.num_experts <= 32:
                ax.set_xticks(positions.tolist(), [str(e) for e in range(analysis.num_experts)], fontsize=7)
        axes[0, column].set_title(f"{analysis.name}: share of top-K selections per expert", fontsize=9)
        axes[0, column].legend(fontsize=7, ncols=min(len(names), 4))
        axes[min(len(its_layers), num_rows) - 1, column].set_xlabel("expert")
    return save_figure(fig, path)


def display_token(text: str) -> str:
    """A token as an axis label: spaces as `·`, line breaks as `\\n`, long special tokens shortened."""
    text = text.replace("\n", "\\n").replace(" ", "·") or "∅"
    return text if len(text) <= 12 else text[:11] + "…"


def plot_token_activations(
    analyses: RoutingAnalysis | Sequence[RoutingAnalysis],
    path: str | Path,
    layers: Sequence[int] | None = None,
    max_tokens: int = 48,
) -> Path:
    """Which experts each token of the example prompt chose: an experts x tokens heatmap per layer and model.

    A cell is coloured by the token's gate probability for an expert in its top-K and left blank otherwise. The last
    `max_tokens` tokens are drawn (the question, after any image), token strings on the axis.
    """
    plt = pyplot()
    analyses = _as_list(analyses)
    chosen = [list(layers) if layers is not None else spread_layers(a.num_layers, 4) for a in analyses]
    num_rows = max(len(c) for c in chosen)
    most_tokens = max(min(len(_need_example(a).input_ids), max_tokens) for a in analyses)
    most_experts = max(a.num_experts for a in analyses)
    fig, axes = plt.subplots(
        num_rows,
        len(analyses),
        figsize=((2.0 + 0.22 * most_tokens) * len(analyses), (1.2 + 0.16 * min(most_experts, 64)) * num_rows),
        squeeze=False,
    )
    # One colour scale for every panel, up to the largest gate probability of a chosen expert on show.
    top = max(
        float(a.example.gate_probs[-max_tokens:].gather(-1, a.example.routes[-max_tokens:]).max()) for a in analyses
    )
    image = None
    for column, (analysis, its_layers) in enumerate(zip(analyses, chosen)):
        example = analysis.example
        routes, probs = example.routes[-max_tokens:], example.gate_probs[-max_tokens:]
        labels = [display_token(t) for t in example.tokens[-max_tokens:]]
        for row in range(num_rows):
            ax = axes[row, column]
            if row >= len(its_layers):
                ax.axis("off")
                continue
            layer = its_layers[row]
            chosen_mask = torch.zeros(probs.shape[0], analysis.num_experts, dtype=torch.bool)
            chosen_mask.scatter_(-1, routes[:, layer], True)
            cells = torch.where(chosen_mask, probs[:, layer], torch.tensor(float("nan")))
            image = ax.imshow(cells.T.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="none")
            ax.set_ylabel(f"layer {layer}\nexpert", fontsize=8)
            last = row == len(its_layers) - 1
            ax.set_xticks(range(len(labels)), labels if last else [], rotation=90, fontsize=7)
            if analysis.num_experts <= 32:
                ax.set_yticks(range(analysis.num_experts), [str(e) for e in range(analysis.num_experts)], fontsize=6)
        axes[0, column].set_title(
            f"{analysis.name}: experts chosen per token (task {example.task}, last {len(labels)} tokens)", fontsize=9
        )
    fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="gate probability (chosen)")
    # The colorbar is shared by every panel: `bbox_inches="tight"` then, as `tight_layout` cannot place it.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_routing_probabilities(
    analyses: RoutingAnalysis | Sequence[RoutingAnalysis], path: str | Path, token: int | None = None
) -> Path:
    """The example prompt's gate probabilities as a layers x experts heatmap per model, chosen experts marked.

    With `token=None` the cells are the mean gate probability over the prompt's tokens and the marks are, per layer,
    the K experts its tokens chose most often; with a token index (negative counts from the end) the cells are that
    token's gate probabilities and the marks its top-K.
    """
    plt = pyplot()
    analyses = _as_list(analyses)
    most_layers = max(a.num_layers for a in analyses)
    most_experts = max(a.num_experts for a in analyses)
    fig, axes = plt.subplots(
        1,
        len(analyses),
        figsize=((2.0 + 0.3 * min(most_experts, 64)) * len(analyses), 1.5 + 0.3 * min(most_layers, 64)),
        squeeze=False,
    )
    image = None
    for column, analysis in enumerate(analyses):
        example, ax = _need_example(analysis), axes[0, column]
        top_k = example.routes.shape[-1]
        if token is None:
            probs = example.gate_probs.double().mean(0)  # [layers, experts]
            counts = selection_counts(example.routes[None], analysis.num_experts)[0]
            marked = counts.topk(top_k, dim=-1, sorted=False).indices
            what = f"mean over {len(example.input_ids)} tokens; marked: the {top_k} experts chosen most often"
        else:
            probs, marked = example.gate_probs[token].double(), example.routes[token]
            what = f"token {token} {display_token(example.tokens[token])!r}; marked: its top-{top_k}"
        image = ax.imshow(probs.numpy(), aspect="auto", cmap="magma", vmin=0.0, interpolation="none")
        layer_ids = torch.arange(probs.shape[0])[:, None].expand_as(marked)
        ax.scatter(
            marked.flatten().tolist(),
            layer_ids.flatten().tolist(),
            marker="s",
            s=60,
            facecolors="none",
            edgecolors="cyan",
            linewidths=1.2,
        )
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        if analysis.num_experts <= 32:
            ax.set_xticks(range(analysis.num_experts))
        if analysis.num_layers <= 32:
            ax.set_yticks(range(analysis.num_layers))
        ax.set_title(f"{analysis.name}: routing probabilities\n({what})", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(fig, path)
