"""The dense model to upcycle: a local folder, a hub name, or an architecture preset (config only)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from transformers import AutoConfig, PretrainedConfig

from ..errors import MoEGRPOError
from .presets import load_preset
from .targets import Target, resolve_target


@dataclass
class DenseSource:
    """What a conversion starts from.

    Attributes:
        folder: the local model folder (`None` for a preset, which has no weights).
        config: the dense model's config.
        target: the conversion that applies to it.
    """

    folder: str | None
    config: PretrainedConfig
    target: Target


def load_source(source: str | None = None, preset: str | None = None) -> DenseSource:
    """Resolve `source` (folder or hub name) or `preset` (exactly one of them) and the conversion that applies.

    The target is resolved from the raw `config.json` before transformers parses it, so an unsupported or custom-code
    model gets our error (listing what is supported), never remote code.
    """
    if (source is None) == (preset is None):
        raise MoEGRPOError("Pass either a source model (folder or hub name) or a preset, not both or neither.")
    if preset is not None:
        raw = load_preset(preset)
        target = resolve_target(raw)
        values = {k: v for k, v in raw.items() if k != "model_type"}
        return DenseSource(folder=None, config=AutoConfig.for_model(raw["model_type"], **values), target=target)
    folder = resolve_folder(source)
    target = resolve_target(read_config(folder))
    return DenseSource(
        folder=folder, config=AutoConfig.from_pretrained(folder, trust_remote_code=False), target=target
    )


def resolve_folder(source: str) -> str:
    """A local folder for `source`: the folder itself, or a hub snapshot of its config, weights and tokenizer files."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise MoEGRPOError(f"Source {source!r} is a file; pass the model's folder (the one with config.json).")
    from huggingface_hub import snapshot_download

    try:
        # Only what a conversion reads: no pickled weights, ever.
        return snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
    except Exception as error:  # the hub raises many kinds (offline, not found, gated, bad name)
        raise MoEGRPOError(
            f"Source {source!r} is not a local folder and could not be fetched from the Hugging Face hub ({error}). "
            "Pass a local folder with config.json and *.safetensors weights."
        ) from error


def read_config(folder: str) -> dict:
    """The raw `config.json` of a model folder."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise MoEGRPOError(f"No config.json in {folder!r}: pass the folder a model was saved to with save_pretrained.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
