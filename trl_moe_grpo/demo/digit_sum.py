"""A small verifiable text task for the examples, tests and benchmarks: the last digit of a sum.

Prompts read `3+9=`; the answer is the last digit of the sum (`2`). The accuracy reward is 1 when the completion starts
with that digit, else 0 (the paper's accuracy reward: 1 correct, 0 otherwise).
"""

from __future__ import annotations

import random

from datasets import Dataset


def digit_sum_dataset(num_prompts: int, seed: int = 0) -> Dataset:
    """`num_prompts` rows with a `prompt` (`"3+9="`) and its `answer` (`"2"`), deterministic by `seed`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_prompts):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)})
    return Dataset.from_list(rows)


def accuracy_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion (leading spaces ignored) starts with the answer digit, else 0.0."""
    return [1.0 if completion.lstrip()[:1] == target else 0.0 for completion, target in zip(completions, answer)]
