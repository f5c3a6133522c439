"""Held-out evaluation as at inference: greedy decoding with the routers' plain top-K."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from ..data_utils import calibration_batches


@torch.no_grad()
def evaluate_accuracy(
    model: torch.nn.Module,
    processing_class,
    rows: list[dict[str, Any]],
    reward_fn: Callable,
    batch_size: int = 16,
    max_new_tokens: int = 4,
) -> dict[str, float]:
    """Mean reward of greedy completions per `task` column value (`"all"` for every row).

    Prompts are built as TRL builds them for generation (chat template, images, left padding). The routers run their
    stock top-K: no controller mode is involved.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = defaultdict(list)
    try:
        device = next(model.parameters()).device
        for start, inputs in zip(
            range(0, len(rows), batch_size), calibration_batches(processing_class, rows, batch_size, device)
        ):
            chunk = rows[start : start + batch_size]
            generated = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            conversational = isinstance(chunk[0]["prompt"], list)
            completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
            rewards = reward_fn(completions, **{k: [row[k] for row in chunk] for k in chunk[0] if k != "prompt"})
            for row, reward in zip(chunk, rewards):
                scores["all"].append(reward)
                if "task" in row:
                    scores[row["task"]].append(reward)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return {task: sum(values) / len(values) for task, values in scores.items()}
