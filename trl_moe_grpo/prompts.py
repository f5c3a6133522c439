"""Model inputs for dataset prompts, built the way TRL builds its generation prompts (chat template, images).

Calibration (`guidance.py`), routing analysis and the accuracy evaluation run the model on prompts outside TRL's
training loop; they encode them here, so their inputs match what the trainer generates from.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def row_images(row: dict[str, Any]) -> list | None:
    """A dataset row's images, read the way TRL reads them (an `images` list or a single `image`)."""
    if row.get("images"):
        return list(row["images"])
    if row.get("image") is not None:
        return [row["image"]]
    return None


def encode_conversations(processing_class, conversations: list, add_generation_prompt: bool) -> dict:
    """Chat-template, tokenize and pad a batch of conversations (images included) into tensors."""
    from transformers import ProcessorMixin

    # Processors take tokenizer options in `processor_kwargs`, tokenizers directly.
    padding = (
        {"processor_kwargs": {"padding": True}} if isinstance(processing_class, ProcessorMixin) else {"padding": True}
    )
    return processing_class.apply_chat_template(
        conversation=conversations,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        **padding,
    )


def calibration_batches(
    processing_class, rows: list[dict[str, Any]], batch_size: int, device: torch.device | str = "cpu"
) -> Iterable[dict[str, torch.Tensor]]:
    """Model inputs for the prompts of `rows`, built as TRL builds generation prompts (chat template, images)."""
    from trl.data_utils import is_conversational, prepare_multimodal_messages

    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if is_conversational(chunk[0]):
            prompts = [prepare_multimodal_messages(row["prompt"], images=row_images(row)) for row in chunk]
            inputs = encode_conversations(processing_class, prompts, add_generation_prompt=True)
        else:
            inputs = processing_class(text=[row["prompt"] for row in chunk], return_tensors="pt", padding=True)
        yield {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
