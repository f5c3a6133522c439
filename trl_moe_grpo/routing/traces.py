"""Routing traces: from what `generate` routed to tensors laid out exactly like TRL's token ids.

Contract (`docs/design.md` §3): for each rollout, `[tokens, layers, top_k]` int16 expert ids in drawn order for
every token the model processed, prompt and completion. Batched, prompts are left-padded and completions right-padded,
with the same `pad_to_multiple_of` as the token ids, and padding holds `-1`.

How `generate` maps onto it: the first call (prefill) routes every prompt token; decode call `j >= 1` routes the
completion token `j - 1` it feeds back. The last completion token is never fed (nothing follows it) unless another row
is still generating; its route could not influence any scored log-probability, so the trace always stores `-1` there.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import pad

from ..errors import MoEGRPOError
from .controller import RolloutRecording


def split_rollout_routes(
    recording: RolloutRecording, prompt_lengths: list[int], completion_lengths: list[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Cut a generation's recorded calls into one prompt trace and one completion trace per rollout.

    Args:
        recording (`RolloutRecording`):
            What the controller recorded during one `generate` call on a left-padded batch.
        prompt_lengths (`list[int]`):
            Unpadded prompt length of each row.
        completion_lengths (`list[int]`):
            Length of each row's completion as TRL keeps it (up to and including the first EOS).

    Returns:
        `(prompt_routes, completion_routes)`: lists of `[length, layers, top_k]` int16 tensors.
    """
    if not recording.steps:
        raise MoEGRPOError("No routing was recorded during generation: was the model called under `rollout()`?")
    prefill, decode = recording.steps[0], recording.steps[1:]
    batch, padded_prompt = prefill.shape[:2]
    if len(prompt_lengths) != batch or len(completion_lengths) != batch:
        raise MoEGRPOError(
            f"Generation routed {batch} rows, but {len(prompt_lengths)} prompts and {len(completion_lengths)} "
            "completions were given."
        )
    if any(step.shape[:2] != (batch, 1) for step in decode):
        raise MoEGRPOError("Expected one token per row in every decode call; is the KV cache disabled?")
    decoded = torch.cat(decode, dim=1) if decode else prefill[:, :0]

    prompt_routes, completion_routes = [], []
    for row, (prompt_length, completion_length) in enumerate(zip(prompt_lengths, completion_lengths, strict=True)):
        if prompt_length > padded_prompt:
            raise MoEGRPOError(f"Prompt {row} has {prompt_length} tokens but generation saw {padded_prompt}.")
        prompt_routes.append(prefill[row, padded_prompt - prompt_length :])
        completion = torch.full((completion_length, *prefill.shape[2:]), -1, dtype=torch.int16, device=prefill.device)
        routed = min(completion_length - 1, decoded.shape[1])  # the last completion token stays -1
        if routed > 0:
            completion[:routed] = decoded[row, :routed]
        completion_routes.append(completion)
    return prompt_routes, completion_routes


def pad_routes(
    prompt_routes: list[torch.Tensor], completion_routes: list[torch.Tensor], pad_to_multiple_of: int | None = None
) -> torch.Tensor:
    """Batch per-rollout traces as TRL batches `prompt_ids` and `completion_ids`, then concatenate them.

    Uses `trl.trainer.utils.pad`, the function TRL pads the token ids with, so the layouts cannot drift apart.

    Returns:
        `torch.Tensor`: `[batch, prompt_width + completion_width, layers, top_k]` int16, `-1` in padding.
    """
    prompts = pad(prompt_routes, padding_value=-1, padding_side="left", pad_to_multiple_of=pad_to_multiple_of)
    completions = pad(completion_routes, padding_value=-1, padding_side="right", pad_to_multiple_of=pad_to_multiple_of)
    return torch.cat([prompts, completions], dim=1)


def unpad_routes(
    routes: torch.Tensor,
    prompt_lengths: list[int],
    completion_lengths: list[int],
    pad_to_multiple_of: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The per-rollout traces `pad_routes` batched: its inverse, for rows whose unpadded lengths are known.

    Returns:
        `(prompt_routes, completion_routes)`: lists of `[length, layers, top_k]` tensors (views of `routes`).
    """
    if routes.shape[0] != len(prompt_lengths) or routes.shape[0] != len(completion_lengths):
        raise MoEGRPOError(
            f"A trace of {routes.shape[0]} rows was given {len(prompt_lengths)} prompt and {len(completion_lengths)} "
            "completion lengths."
        )
    prompt_width = max(prompt_lengths, default=0)
    if pad_to_multiple_of and prompt_width % pad_to_multiple_of:
        prompt_width += pad_to_multiple_of - prompt_width % pad_to_multiple_of
    if prompt_width + max(completion_lengths, default=0) > routes.shape[1]:
        raise MoEGRPOError(f"A trace of {routes.shape[1]} tokens cannot hold these prompt and completion lengths.")
    prompt_routes = [routes[row, prompt_width - n : prompt_width] for row, n in enumerate(prompt_lengths)]
    completion_routes = [routes[row, prompt_width : prompt_width + n] for row, n in enumerate(completion_lengths)]
    return prompt_routes, completion_routes
