"""Loading models, processors and datasets for the command line and recipes, the way users load them."""

from __future__ import annotations

import os

from .errors import MoEGRPOError
from .routing.introspection import vision_token_ids

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


def load_dataset_split(name_or_path: str, split: str = "train", *, name: str | None = None, streaming: bool = False):
    """One split of a dataset: a folder saved with `save_to_disk`, a data file (json/jsonl/csv/parquet; the file is
    the split asked for) or anything else `datasets.load_dataset` loads (a folder of data files, a hub name; `name`
    is its configuration). `streaming` returns an `IterableDataset`.
    """
    import datasets

    saved, builder = _is_saved_dataset(name_or_path), DATA_FILE_BUILDERS.get(os.path.splitext(name_or_path)[1])
    if name is not None and (saved or builder):
        raise MoEGRPOError(
            f"A dataset configuration name ({name!r}) applies to what `datasets.load_dataset` loads (a hub name, a "
            f"folder of data files), not to {name_or_path!r}."
        )
    if saved:
        return _split(datasets.load_from_disk(name_or_path), split, name_or_path, streaming)
    if builder is not None:
        return datasets.load_dataset(builder, data_files={split: name_or_path}, split=split, streaming=streaming)
    return datasets.load_dataset(name_or_path, name=name, split=split, streaming=streaming)


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")
    )


def _split(loaded, split: str, name_or_path: str, streaming: bool):
    """`split` of a `DatasetDict` (a single `Dataset` is every split, as before), streamed if asked."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise MoEGRPOError(f"Dataset {name_or_path!r} has no split {split!r}; its splits: {list(loaded)}.")
        loaded = loaded[split]
    return loaded.to_iterable_dataset() if streaming else loaded
