"""Route sensitivity: how often a prompt's sampled-routing rollouts disagree in reward, before any training.

MoE-GRPO learns only from groups whose G rollouts get different rewards: with equal rewards every group-relative
advantage is 0 and so is every policy gradient, Gate-GRPO's included. With greedy tokens (MoE-GRPO's default) the
rollouts of a prompt differ only through routing, so the **share of prompts with reward spread** under sampled
routing is the signal MoE-GRPO lives on. Measuring it takes minutes; a run whose share is near 0 has nothing to learn
from routing, whatever its length.

`measure_route_sensitivity` generates G rollouts per prompt with the controller's `rollout(routing)` (every router
samples its experts, as in MoE-GRPO's rollouts) and scores them with the reward functions; the command
`trl-moe-grpo probe-routing` runs it for the settings that move the share (sampled tokens instead of greedy ones,
a larger G, top-K routing for comparison). Prompts are built as TRL builds them (chat template, images, left
padding), completions are decoded and passed to the rewards as TRL passes them (plain text, or an assistant message
for conversational prompts, with the dataset's other columns as keyword arguments).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data_utils import calibration_batches
from ..errors import MoEGRPOError
from ..routing.controller import RoutingController


@dataclass
class RouteSensitivity:
    """Rewards of G rollouts per prompt under one setting.

    Attributes:
        routing: the rollouts' routing (`"sample"`, `"topk"` or `"noise"`).
        greedy: whether tokens were decoded greedily (else sampled at `temperature`).
        rewards: `[prompts, G]` float64 summed rewards.
        lengths: `[prompts, G]` int64 completion lengths in tokens (the EOS token counted).
        texts: per prompt, its G decoded completions.
    """

    routing: str
    greedy: bool
    rewards: torch.Tensor
    lengths: torch.Tensor
    texts: list[list[str]]

    @property
    def num_generations(self) -> int:
        return self.rewards.shape[1]

    def share_with_spread(self, num_generations: int | None = None) -> float:
        """Share of prompts whose first `num_generations` (default all G) rollouts do not all get the same reward."""
        rewards = self.rewards[:, : num_generations or self.num_generations]
        return float((rewards.amax(-1) != rewards.amin(-1)).double().mean())

    def share_with_distinct_completions(self, num_generations: int | None = None) -> float:
        """Share of prompts whose first `num_generations` (default all G) completions are not all the same text: an
        upper bound of `share_with_spread` (rollouts that write the same text get the same reward)."""
        group = num_generations or self.num_generations
        return sum(len(set(texts[:group])) > 1 for texts in self.texts) / len(self.texts)

    def mean_reward(self, num_generations: int | None = None) -> float:
        return float(self.rewards[:, : num_generations or self.num_generations].mean())

    def mean_completion_length(self, num_generations: int | None = None) -> float:
        return float(self.lengths[:, : num_generations or self.num_generations].double().mean())


def _completion_lengths(completion_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Tokens up to and including the first EOS (all of them without one), per row."""
    if eos_token_id is None:
        return torch.full(completion_ids.shape[:1], completion_ids.shape[1], dtype=torch.long)
    is_eos = completion_ids == eos_token_id
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, completion_ids.shape[1])
    return first.long().cpu()


def score_completions(
    reward_funcs: Sequence[Callable], rows: list[dict[str, Any]], texts: list[str], completion_ids: list[list[int]]
) -> list[float]:
    """Summed rewards of completions `texts` of `rows`, called as TRL calls reward functions.

    Conversational prompts get assistant-message completions; every other column of the rows is passed as a keyword
    list. A reward function's `None` adds nothing to the sum, as in TRL (`nansum` of the functions' rewards).
    """
    conversational = isinstance(rows[0]["prompt"], list)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    prompts = [row["prompt"] for row in rows]
    columns = {k: [row[k] for row in rows] for k in rows[0] if k not in ("prompt", "completion", "completion_ids")}
    per_func = []
    for func in reward_funcs:
        values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if len(values) != len(rows):
            name = getattr(func, "__name__", repr(func))
            raise MoEGRPOError(f"Reward function {name} returned {len(values)} rewards for {len(rows)} completions.")
        per_func.append([math.nan if v is None else float(v) for v in values])
    rewards = torch.tensor(per_func, dtype=torch.float64)  # [funcs, rows]
    return rewards.nansum(0).tolist()


@torch.no_grad()
def measure_route_sensitivity(
    model: torch.nn.Module,
    controller: RoutingController,
    processing_class,
    rows: list[dict[str, Any]],
    reward_funcs: Sequence[Callable],
    num_generations: int = 8,
    routing: str = "sample",
    greedy: bool = True,
    temperature: float = 1.0,
    max_completion_length: int = 16,
    prompts_per_batch: int = 4,
) -> RouteSensitivity:
    """Generate `num_generations` rollouts per prompt of `rows` with `routing`, and score them.

    Args:
        model: the MoE model (eval mode is set while measuring).
        controller: its routing controller; `rollout(routing)` routes every generated token.
        processing_class: tokenizer or processor; prompts are padded on the left while measuring.
        rows: dataset rows with a `prompt` (plain or conversational) and the columns the rewards read.
        reward_funcs: reward functions (TRL's signature); their rewards are summed.
        num_generations: G, rollouts per prompt.
        routing: `"sample"` (MoE-GRPO), `"topk"` (plain GRPO) or `"noise"`.
        greedy: greedy tokens (MoE-GRPO's default under sampled routing); else sampled at `temperature`, no top-k or
            top-p cut (TRL's defaults).
        temperature: sampling temperature of the tokens when not `greedy`.
        max_completion_length: new tokens per rollout at most.
        prompts_per_batch: prompts per `generate` call (each repeated G times).
    """
    if num_generations < 1 or max_completion_length < 1 or prompts_per_batch < 1 or not rows:
        raise MoEGRPOError(
            "Route sensitivity needs at least one prompt, num_generations >= 1, max_completion_length >= 1 and "
            "prompts_per_batch >= 1."
        )
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    decoding = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature}
    decoding.update(top_k=None if greedy else 0, top_p=None if greedy else 1.0)
    repeated = [row for row in rows for _ in range(num_generations)]
    batch_rows = prompts_per_batch * num_generations
    rewards: list[float] = []
    lengths: list[torch.Tensor] = []
    texts: list[str] = []
    try:
        device = next(model.parameters()).device
        batches = calibration_batches(processing_class, repeated, batch_rows, device)
        for start, inputs in zip(range(0, len(repeated), batch_rows), batches):
            chunk = repeated[start : start + batch_rows]
            with controller.rollout(routing):
                generated = model.generate(
                    **inputs,
                    max_new_tokens=max_completion_length,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **decoding,
                )
            completion_ids = generated[:, inputs["input_ids"].shape[1] :]
            its_lengths = _completion_lengths(completion_ids, tokenizer.eos_token_id)
            ids = [row[:n].tolist() for row, n in zip(completion_ids.cpu(), its_lengths)]
            decoded = tokenizer.batch_decode(ids, skip_special_tokens=True)
            rewards += score_completions(reward_funcs, chunk, decoded, ids)
            lengths.append(its_lengths)
            texts += decoded
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return RouteSensitivity(
        routing=routing,
        greedy=greedy,
        rewards=torch.tensor(rewards, dtype=torch.float64).reshape(len(rows), num_generations),
        lengths=torch.cat(lengths).reshape(len(rows), num_generations),
        texts=[texts[i : i + num_generations] for i in range(0, len(texts), num_generations)],
    )


def format_route_sensitivity(results: Sequence[tuple[str, RouteSensitivity, int]]) -> str:
    """A table: one line per `(label, result, G)` with the share of prompts with reward spread, mean reward and
    mean completion length over the first G rollouts of each prompt."""
    label_width = max(len(label) for label, _, _ in results) + 2
    header = "setting".ljust(label_width) + "   G  prompts with reward spread  mean reward  mean completion length"
    lines = [header, "-" * len(header)]
    for label, result, group in results:
        lines.append(
            label.ljust(label_width)
            + f"{group:>4}"
            + f"{result.share_with_spread(group):>28.1%}"
            + f"{result.mean_reward(group):>13.3f}"
            + f"{result.mean_completion_length(group):>24.2f}"
        )
    return "\n".join(lines)
