"""Zero-shot classification with a CLIP (dense or MoE): class-prompt embeddings, image logits, dataset checks.

The classifier of a dataset is CLIP's zero-shot one: each class name goes into a prompt template (`"a photo of a
{}"`), the text tower embeds the prompts once, and an image's logits are `logit_scale * cos(image, prompt)`. The
prediction is the arg-max. Datasets are any `datasets.Dataset` (or list of rows) with an `image` column (PIL images
or arrays) and an integer `label` column; class names come from the `label` column's `ClassLabel` names unless given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import MoEGRPOError

DEFAULT_TEMPLATE = "a photo of a {}"


def class_names_of(dataset, class_names: Sequence[str] | None = None) -> list[str]:
    """The class names of `dataset`: `class_names` if given (checked against the labels), else its `ClassLabel` names.

    Raises:
        MoEGRPOError: no `image` or `label` column, no class names anywhere, or labels outside the class names.
    """
    columns = _columns(dataset)
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise MoEGRPOError(
            f"The dataset has no {' or '.join(f'`{c}`' for c in missing)} column (it has: {', '.join(columns)}). "
            "Image classification needs an `image` column and an integer `label` column; rename yours with "
            "`dataset.rename_column(old, new)`."
        )
    features = getattr(dataset, "features", None)
    names_in_data = getattr(features.get("label"), "names", None) if features is not None else None
    if class_names is None:
        if not names_in_data:
            raise MoEGRPOError(
                "The dataset's `label` column has no class names (it is not a `ClassLabel`): pass `class_names=` "
                "(`--class-names` on the command line), one per label, in label order."
            )
        class_names = names_in_data
    class_names = [str(name) for name in class_names]
    if names_in_data and len(names_in_data) != len(class_names):
        raise MoEGRPOError(
            f"{len(class_names)} class names were given, but the dataset's `label` column has {len(names_in_data)} "
            "classes: give one name per class, in label order."
        )
    labels = _labels(dataset)
    if labels and (min(labels) < 0 or max(labels) >= len(class_names)):
        raise MoEGRPOError(
            f"Labels run from {min(labels)} to {max(labels)}, but there are {len(class_names)} class names: give "
            "one name per label, in label order."
        )
    return class_names


def _columns(dataset) -> list[str]:
    if isinstance(dataset, list):
        return sorted(dataset[0]) if dataset else []
    return list(dataset.column_names)


def _labels(dataset) -> list[int]:
    if isinstance(dataset, list):
        return [int(row["label"]) for row in dataset]
    return [int(label) for label in dataset["label"]]


def prompts(class_names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The class prompts: `template` with each class name in place of `{}`."""
    if "{}" not in template:
        raise MoEGRPOError(
            f"The prompt template {template!r} has no `{{}}` for the class name, e.g. 'a photo of a {{}}'."
        )
    return [template.format(name) for name in class_names]


@torch.no_grad()
def class_embeddings(model, tokenizer, class_names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
    """`[classes, dim]` unit-norm text embeddings of the class prompts (no gradient: the text tower is not trained)."""
    text = tokenizer(prompts(class_names, template), padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    features = model.get_text_features(
        input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device)
    ).pooler_output
    return F.normalize(features.float(), dim=-1)


def image_logits(model, pixel_values: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """`[images, classes]` zero-shot logits, `logit_scale.exp() * cos(image embedding, class embedding)`."""
    image = model.get_image_features(pixel_values=pixel_values).pooler_output
    image = F.normalize(image.float(), dim=-1)
    return model.logit_scale.exp().float() * image @ text_embeddings.to(image.device).T


def pixel_values(image_processor, images) -> torch.Tensor:
    """`[images, 3, H, W]` pixel values of PIL images (or arrays), converted to RGB first."""
    converted = [image.convert("RGB") if hasattr(image, "convert") else image for image in images]
    return image_processor(images=converted, return_tensors="pt")["pixel_values"]


def encode_dataset(dataset, image_processor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """`(pixel_values, labels)` of a whole dataset, batch by batch."""
    values, labels = [], []
    rows = len(dataset)
    for start in range(0, rows, batch_size):
        batch = dataset[start : start + batch_size]
        if isinstance(batch, list):  # a list of row dicts
            batch = {"image": [row["image"] for row in batch], "label": [row["label"] for row in batch]}
        values.append(pixel_values(image_processor, batch["image"]))
        labels.append(torch.as_tensor(batch["label"], dtype=torch.long))
    if not values:
        raise MoEGRPOError("The dataset is empty: there is nothing to classify.")
    return torch.cat(values), torch.cat(labels)
