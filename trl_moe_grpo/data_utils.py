"""Model inputs for dataset prompts, built the way TRL builds its generation prompts (chat template, images).

Calibration (`guidance.py`), routing analysis and the accuracy evaluation run the model on prompts outside TRL's
training loop; they encode them here, so their inputs match what the trainer generates from. The fine-tuning baselines
take their rows from here too (`sft_rows_from_answers`), so both methods see exactly the same data.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch
from trl.data_utils import is_conversational

from .errors import MoEGRPOError


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


def _answer_text(answer: Any, answer_column: str) -> str:
    """The training target of one reference answer; refuses values `str` would turn into a wrong target."""
    if answer is None:
        raise MoEGRPOError(
            f"A row's `{answer_column}` is None: SFT would train the model to answer the text 'None'. Drop the rows "
            f"without an answer (e.g. `dataset.filter(lambda row: row[{answer_column!r}] is not None)`) before "
            "`sft_rows_from_answers`."
        )
    if isinstance(answer, str):
        return answer
    if isinstance(answer, numbers.Number) and not isinstance(answer, bool):
        return str(answer)
    raise MoEGRPOError(
        f"A row's `{answer_column}` is a {type(answer).__name__} ({answer!r}): SFT would train the model to write "
        f"its Python repr {str(answer)!r}. Map the column to the one answer string to train on (e.g. join several "
        "accepted answers, or keep the first) before `sft_rows_from_answers`."
    )


def sft_rows_from_answers(dataset, answer_column: str = "answer"):
    """Add the `completion` column SFT trains on to a MoE-GRPO dataset: each row's reference answer.

    MoE-GRPO datasets have a `prompt` (a string, or a conversation whose user turn may hold an image part, with the
    image in an `image` column) and an `answer` column. This adds `completion`: `[{"role": "assistant", "content":
    answer}]` for conversational prompts, the answer string otherwise. `SFTTrainer` then trains prompt-completion
    rows with the loss on the completion only, on exactly the data MoE-GRPO uses. Other columns are kept; TRL 1.16's
    vision collator reads the `image` (or `images`) column as it is.

    Args:
        dataset (`datasets.Dataset`, `datasets.IterableDataset`, `datasets.DatasetDict` or `list[dict]`):
            Rows with `prompt` and `answer_column`.
        answer_column (`str`, *optional*, defaults to `"answer"`):
            The column holding the reference answer: a string, or a number (converted with `str`). `None` and
            containers (lists, dicts) are refused, since `str` would turn them into targets such as `"None"` or
            `"['A', 'B']"`.

    Returns:
        The same kind of object as `dataset`, with a `completion` column.
    """

    def add_completion(row: dict[str, Any]) -> dict[str, Any]:
        if "prompt" not in row or answer_column not in row:
            raise MoEGRPOError(
                f"`sft_rows_from_answers` needs `prompt` and `{answer_column}` columns; a row has {sorted(row)}. Pass "
                "`answer_column=` to name the answer's column."
            )
        if "completion" in row:
            raise MoEGRPOError(
                "The rows already have a `completion` column; `sft_rows_from_answers` would overwrite it."
            )
        answer = _answer_text(row[answer_column], answer_column)
        if is_conversational({"prompt": row["prompt"]}):
            return {"completion": [{"role": "assistant", "content": answer}]}
        return {"completion": answer}

    if isinstance(dataset, list):
        return [{**row, **add_completion(row)} for row in dataset]
    columns = dataset.column_names
    if isinstance(columns, dict):  # a DatasetDict: every split
        columns = {name for split in columns.values() for name in split}
    if columns is not None and "completion" in columns:
        raise MoEGRPOError("The rows already have a `completion` column; `sft_rows_from_answers` would overwrite it.")
    return dataset.map(add_completion)
