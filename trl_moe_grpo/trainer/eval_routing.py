"""The routing of one `trainer.evaluate()` run, gathered batch by batch and measured over the whole evaluation set.

Per-batch means (what TRL logs for its other metrics) cannot give the measures of `routing_analysis`: the task-wise
JSD and the sequence routing entropy need every sequence's expert counts. The trainer adds each evaluation batch here
(its rows' tasks when it generates them, their routes and gate distributions when it scores them) and turns the
collection into a `RoutingAnalysis` at the end of the loop, over all processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import gather_object

from ..analysis.measures import MODALITIES, entropy, modality_token_mask, selection_counts
from ..analysis.routing import ALL_TASKS, RoutingAnalysis, row_task


class EvalRoutingCollector:
    """Expert counts per sequence, tasks and gate entropies of the evaluation batches seen so far (this process)."""

    def __init__(self, num_layers: int, num_experts: int, task_column: str | None):
        self.num_experts = num_experts
        self.task_column = task_column
        self.counts: list[torch.Tensor] = []  # [batch, layers, experts] int64 per batch
        self.tasks: list[str] = []
        self.gate_entropy_sum = torch.zeros(num_layers, dtype=torch.float64)
        self.num_tokens = 0
        # Per modality, [batch, layers, experts] counts per batch; filled only when the batches' modality is given.
        self.modality_counts: dict[str, list[torch.Tensor]] = {modality: [] for modality in MODALITIES}

    def add_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """The dataset rows of a generated evaluation batch, in the batch's order (one per completion)."""
        self.tasks += [row_task(row, self.task_column) for row in rows]

    @torch.no_grad()
    def add_routing(
        self,
        routes: torch.Tensor,
        mask: torch.Tensor,
        gate_log_probs: torch.Tensor,
        token_modality: torch.Tensor | None = None,
    ) -> None:
        """One scored batch: `routes` `[batch, tokens, layers, top_k]` (top-K in evaluation), `mask` `[batch, tokens]`
        (the tokens with a route), `gate_log_probs` `[layers, batch * tokens, experts]`, and optionally each token's
        modality `[batch, tokens]` (`RoutingController.token_modality`) for the text / vision measures. Give it for
        every batch of an evaluation or for none."""
        self.counts.append(selection_counts(routes, self.num_experts, mask).cpu())
        if token_modality is not None:
            for modality in MODALITIES:
                modality_mask = modality_token_mask(token_modality.to(mask.device), modality, mask)
                self.modality_counts[modality].append(selection_counts(routes, self.num_experts, modality_mask).cpu())
        per_token = entropy(gate_log_probs.exp(), dim=-1)  # [layers, rows]
        valid = mask.reshape(-1).bool().to(per_token.device)  # an int mask would index rows, not select them
        self.gate_entropy_sum += per_token[:, valid].sum(-1).cpu()
        self.num_tokens += int(valid.sum())

    def analysis(self, name: str, identity: dict[str, Any]) -> RoutingAnalysis:
        """The routing measures over every process's evaluation batches."""
        scored = sum(len(c) for c in self.counts)
        if len(self.tasks) != scored:
            raise RuntimeError(f"{len(self.tasks)} evaluation rows were generated but {scored} scored.")
        shape = (self.gate_entropy_sum.numel(), self.num_experts)
        local = torch.cat(self.counts).tolist() if self.counts else []
        counts = torch.tensor(gather_object(local), dtype=torch.long).reshape(-1, *shape)
        tasks = gather_object(list(self.tasks))
        entropy_sums = gather_object([self.gate_entropy_sum.tolist()])
        num_tokens = sum(gather_object([self.num_tokens]))
        gate_entropy = torch.tensor(entropy_sums, dtype=torch.float64).sum(0) / max(num_tokens, 1)
        task_column = self.task_column if any(task != ALL_TASKS for task in tasks) else None
        modality_counts = {}
        if all(len(parts) == len(self.counts) for parts in self.modality_counts.values()) and self.counts:
            for modality, parts in self.modality_counts.items():
                gathered = gather_object(torch.cat(parts).tolist())
                modality_counts[modality] = torch.tensor(gathered, dtype=torch.long).reshape(-1, *shape)
        return RoutingAnalysis(
            name=name,
            model=identity,
            counts=counts,
            tasks=tasks,
            gate_entropy=gate_entropy,
            num_tokens=num_tokens,
            task_column=task_column,
            modality_counts=modality_counts,
            tokens="prompt and completion",
        )
