"""Upcycle a saved dense CLIP folder into a saved CLIP-MoE folder (`trl-moe-grpo upcycle` on a CLIP).

`init` is one of `ExpertInit`'s (`copy`, `noise`, `drop`: `upcycle.upcycle_clip_model`) or `"multiplet"`, the CLIP-MoE
paper's Diversified Multiplet Upcycling: the experts are the MLPs of several CLIP fine-tunes obtained by multistage
contrastive learning on image-caption pairs (`multiplet.py`, where what follows the official implementation and what
differs is listed).

CLIP models are small, so the conversion builds both models in memory (unlike the streaming language-model
upcycler), and writes the result with `save_pretrained` (safetensors and JSON) next to the source's tokenizer and
image processor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from transformers import CLIPModel

from ..errors import MoEGRPOError
from ..upcycle.init import DEFAULT_INIT, MULTIPLET, ExpertInit, resolve_init
from .modeling import CLIPMoeModel
from .multiplet import diversified_multiplet_upcycle
from .upcycle import active_parameters, moe_config_from_clip, upcycle_clip_model


@dataclass
class CLIPUpcycleResult:
    """What `upcycle_clip` wrote.

    Attributes:
        output_dir: the output folder.
        conversion: `clip -> clip_moe`.
        moe_layers: the vision-encoder layers that became MoE layers.
        dense_parameters, total_parameters, active_parameters: parameter counts (active: per token, top-K experts).
        copied: what was copied besides the weights (`tokenizer`, `image_processor`).
    """

    output_dir: str
    conversion: str
    moe_layers: list[int]
    dense_parameters: int
    total_parameters: int
    active_parameters: int
    copied: list[str]

    def summary(self) -> str:
        return (
            f"{self.conversion}: MoE layers {self.moe_layers}; parameters dense {self.dense_parameters:,}, MoE total "
            f"{self.total_parameters:,}, active per token {self.active_parameters:,}; copied: "
            f"{', '.join(self.copied) or 'nothing'}; wrote {self.output_dir}"
        )


def is_clip_folder(source: str) -> bool:
    """Whether `source` is a local folder holding a dense CLIP (`config.json` with `model_type` 'clip')."""
    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "clip"


def upcycle_clip(
    source: str,
    output_dir: str,
    num_experts: int = 8,
    top_k: int = 2,
    init: ExpertInit | str = DEFAULT_INIT,
    *,
    moe_layers: list[int] | None = None,
    overwrite: bool = False,
    pairs=None,
) -> CLIPUpcycleResult:
    """Upcycle the dense CLIP saved in the folder `source` into a CLIP-MoE saved in `output_dir`.

    The tokenizer and image processor of `source`, when it has them, are saved beside the model. The output loads
    with `transformers.AutoModel.from_pretrained(output_dir)` once `trl_moe_grpo.clip_moe` is imported.

    `init` is an `ExpertInit` or the name of a kind with its default settings. `init="multiplet"` (or
    `ExpertInit("multiplet", seed=...)`) is the CLIP-MoE paper's Diversified Multiplet Upcycling (`multiplet.py`): it
    trains, so it needs `pairs`, a dataset (or list of rows) with `image` and `caption` columns, and the source's
    tokenizer and image processor; of the `ExpertInit` settings only `seed` applies to it.

    Raises:
        MoEGRPOError: the source is not a local dense CLIP folder, the output holds a model (without `overwrite`), or
            the options are invalid.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    from ..upcycle.convert import prepare_output

    if not os.path.isdir(source) or not is_clip_folder(source):
        raise MoEGRPOError(
            f"{source!r} is not a local folder with a dense CLIP (config.json with model_type 'clip'). Save one with "
            "`CLIPModel.save_pretrained(folder)`."
        )
    init = resolve_init(init)
    dense = CLIPModel.from_pretrained(source)
    if init.kind == MULTIPLET:
        moe = _multiplet(dense, source, pairs, num_experts, top_k, init.seed, moe_layers)
    else:
        if pairs is not None:
            raise MoEGRPOError(f"`pairs` are the training data of init='multiplet'; init={init.kind!r} uses none.")
        # Built before anything is written, so bad options leave the output folder alone.
        moe = upcycle_clip_model(dense, num_experts, top_k, init, moe_layers=moe_layers)
    prepare_output(source, output_dir, overwrite)
    moe.save_pretrained(output_dir)
    copied = []
    for name, loader in (("tokenizer", AutoTokenizer), ("image_processor", AutoImageProcessor)):
        try:
            loader.from_pretrained(source).save_pretrained(output_dir)
            copied.append(name)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # the source has none: the user brings their own
    return CLIPUpcycleResult(
        output_dir=output_dir,
        conversion="clip -> clip_moe",
        moe_layers=[
            i for i in range(moe.config.vision_config.num_hidden_layers) if moe.config.vision_config.is_moe_layer(i)
        ],
        dense_parameters=sum(p.numel() for p in dense.parameters()),
        total_parameters=sum(p.numel() for p in moe.parameters()),
        active_parameters=active_parameters(moe),
        copied=copied,
    )


def clip_parameter_summary(source: str, num_experts: int = 8, top_k: int = 2) -> str:
    """Dense, MoE-total and active parameter counts of upcycling the CLIP in `source`, built on the meta device."""
    from transformers import AutoConfig

    dense_config = AutoConfig.from_pretrained(source)
    config = moe_config_from_clip(dense_config, num_experts, top_k)
    with torch.device("meta"):
        dense, moe = CLIPModel(dense_config), CLIPMoeModel(config)
    return (
        f"clip -> clip_moe ({num_experts} experts, top-{top_k}): parameters dense "
        f"{sum(p.numel() for p in dense.parameters()):,}, MoE total {sum(p.numel() for p in moe.parameters()):,}, "
        f"active per token {active_parameters(moe):,}"
    )


def _multiplet(dense, source: str, pairs, num_experts: int, top_k: int, seed: int, moe_layers) -> CLIPMoeModel:
    from transformers import AutoImageProcessor, AutoTokenizer

    if moe_layers is not None:
        raise MoEGRPOError("init='multiplet' makes every vision layer an MoE layer; leave `moe_layers` unset.")
    if pairs is None:
        raise MoEGRPOError(
            "init='multiplet' trains on image-caption pairs: pass `pairs` (`--pairs DATASET` on the command line), "
            "a dataset with `image` and `caption` columns."
        )
    columns = sorted(pairs[0]) if isinstance(pairs, list) else list(pairs.column_names)
    if "image" not in columns or "caption" not in columns:
        raise MoEGRPOError(
            f"The pairs have columns {', '.join(columns)}; Diversified Multiplet Upcycling needs `image` and "
            "`caption` columns."
        )
    try:
        tokenizer, image_processor = AutoTokenizer.from_pretrained(source), AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise MoEGRPOError(
            f"init='multiplet' needs the tokenizer and image processor of {source!r} ({error}): save them beside the "
            "model."
        ) from error
    images = [row["image"] for row in pairs] if isinstance(pairs, list) else list(pairs["image"])
    captions = [row["caption"] for row in pairs] if isinstance(pairs, list) else list(pairs["caption"])
    images = [image.convert("RGB") if hasattr(image, "convert") else image for image in images]
    moe, _ = diversified_multiplet_upcycle(
        dense, tokenizer, image_processor, images, captions, num_experts, top_k, seed=seed
    )
    return moe
