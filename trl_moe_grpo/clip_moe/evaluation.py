"""Top-1 accuracy of a CLIP (dense or MoE, stock top-K routing) per dataset, and the cross-dataset / domain tables.

`zero_shot_accuracy` scores one dataset with the zero-shot classifier of its class names (`classify.py`);
`evaluate_datasets` scores several; `evaluate_suites` scores the generated suites of the miniature;
`format_table` lays out rows of accuracies (one row per model) as the paper's Tables 2-3 do, with an average column.
An MoE model is evaluated with its routers' own top-K: no routing controller is involved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .classify import DEFAULT_TEMPLATE, class_embeddings, class_names_of, encode_dataset, image_logits


@torch.no_grad()
def zero_shot_accuracy(
    model,
    tokenizer,
    image_processor,
    dataset,
    class_names: Sequence[str] | None = None,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of `model`'s zero-shot classifier on `dataset` (`image` and `label` columns).

    Args:
        model: a `CLIPModel` or `CLIPMoeModel`.
        tokenizer, image_processor: the model's.
        dataset: a `datasets.Dataset` (or list of rows) with `image` and `label` columns.
        class_names: one per label, in label order; `None` reads the `label` column's `ClassLabel` names.
        template: the class prompt, `{}` the class name.
        batch_size: images per forward.
    """
    names = class_names_of(dataset, class_names)
    was_training = model.training
    model.eval()
    text = class_embeddings(model, tokenizer, names, template)
    pixels, labels = encode_dataset(dataset, image_processor, batch_size)
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = image_logits(model, pixels[start : start + batch_size].to(device), text)
        correct += int((logits.argmax(-1).cpu() == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(labels)


def evaluate_datasets(
    model,
    tokenizer,
    image_processor,
    datasets: Mapping[str, object],
    templates: Mapping[str, str] | None = None,
    class_names: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Top-1 accuracy on each of `datasets` (name -> dataset), each with its own template and class names."""
    templates, class_names = templates or {}, class_names or {}
    return {
        name: zero_shot_accuracy(
            model,
            tokenizer,
            image_processor,
            dataset,
            class_names.get(name),
            templates.get(name, DEFAULT_TEMPLATE),
            batch_size,
        )
        for name, dataset in datasets.items()
    }


def suite_datasets(names: Sequence[str], per_class: int, seed: int) -> dict[str, object]:
    """The generated suites `names` (see `images.SUITES`), `per_class` images per class drawn with `seed`."""
    from .images import classification_dataset

    return {name: classification_dataset(name, per_class, seed) for name in names}


def evaluate_suites(
    model, tokenizer, image_processor, names: Sequence[str], per_class: int = 25, seed: int = 1, datasets=None
) -> dict[str, float]:
    """Top-1 accuracy on the generated suites `names`, each with its own prompt template."""
    from .images import SUITES

    datasets = datasets if datasets is not None else suite_datasets(names, per_class, seed)
    return evaluate_datasets(
        model, tokenizer, image_processor, {n: datasets[n] for n in names}, {n: SUITES[n].template for n in names}
    )


def format_table(rows: Mapping[str, Mapping[str, str]], columns: Sequence[str], average: bool = True) -> str:
    """A markdown table: one row per model (`rows[model][column]` already formatted), columns in order."""
    header = ["method", *columns] + (["average"] if average else [])
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for name, values in rows.items():
        cells = [values.get(c, "") for c in columns] + ([values.get("average", "")] if average else [])
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)
