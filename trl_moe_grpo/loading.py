"""Loading models, processors and datasets for the command line and recipes, the way users load them."""

from __future__ import annotations

import os

from .guidance import vision_token_ids

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_model_and_processor(name_or_path: str, trust_remote_code: bool = False):
    """`(model, processing_class, vision_token_ids)` for a local folder or hub name, in eval mode.

    Vision-language configs (with a `vision_config`) load as `AutoModelForImageTextToText`, others as
    `AutoModelForCausalLM`; `AutoProcessor` falls back to the tokenizer for text-only models.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).eval()
    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return model, processor, vision_token_ids(model)


def load_dataset_split(name_or_path: str, split: str = "train", **visual_mc_options):
    """One split of a dataset: `visual_mc` (generated, see `visual_mc.py`), a folder saved with `save_to_disk`, a data
    file (json/jsonl/csv/parquet) or a hub name. `visual_mc_options` go to `visual_mc_dataset` (sizes, seed)."""
    import datasets

    if name_or_path == "visual_mc":
        from .visual_mc import visual_mc_dataset

        return visual_mc_dataset(**visual_mc_options)[split]

    if os.path.isdir(name_or_path) and any(
        os.path.exists(os.path.join(name_or_path, f)) for f in ("dataset_info.json", "dataset_dict.json")
    ):
        loaded = datasets.load_from_disk(name_or_path)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    builder = DATA_FILE_BUILDERS.get(os.path.splitext(name_or_path)[1])
    if builder is not None:
        return datasets.load_dataset(builder, data_files={split: name_or_path}, split=split)
    return datasets.load_dataset(name_or_path, split=split)
