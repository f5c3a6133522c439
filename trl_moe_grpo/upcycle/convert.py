"""`upcycle`: convert a dense checkpoint into an MoE checkpoint of a stock architecture, streaming tensor by tensor.

The conversion never builds either model. It first *plans* the output from the source's safetensors headers alone:
every tensor is copied through unchanged except each decoder layer's dense MLP weights, which fan out into
`num_experts` expert weights (see `init.py`), plus a fresh router per layer. Keys and config follow the MoE model's own
`save_pretrained` layout (see `targets.py`), so `AutoModelForCausalLM` / `AutoModelForImageTextToText.from_pretrained`
load the result with no custom code. Every check (supported model, complete checkpoint, shapes) runs on the plan,
before a byte is written. Then it streams: each output shard's header is written, and each tensor is read, turned into
its experts and appended one at a time (see `checkpoint.py`). The tokenizer or processor (with its chat template) and
the generation config are copied over.

Memory: one source tensor and one output tensor at a time (an MLP matrix and one expert of it), whatever the size of
the model or of its shards.
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from ..errors import MoEGRPOError
from .checkpoint import (
    DTYPE_SIZES,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    TORCH_DTYPES,
    SourceCheckpoint,
    StreamingShard,
    TensorInfo,
    write_index,
)
from .init import DEFAULT_INIT, ExpertInit, resolve_init
from .report import ParameterReport, compare
from .source import load_source
from .targets import DENSE_MLP_KEY, PROJECTIONS, Target

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


@dataclass
class UpcycleResult:
    """What `upcycle` wrote.

    Attributes:
        output_dir: the output folder.
        conversion: e.g. `qwen3 -> qwen3_moe`.
        architecture: the output's architecture class (what `from_pretrained` builds).
        shards: the weight files written.
        source_bytes, output_bytes: size of the source and output weights.
        copied: the non-weight parts copied over (`tokenizer` or `processor`, `generation_config`).
        report: parameter counts per component (dense, MoE total, MoE active).
    """

    output_dir: str
    conversion: str
    architecture: str
    shards: list[str]
    source_bytes: int
    output_bytes: int
    copied: list[str]
    report: ParameterReport


@dataclass(frozen=True)
class Job:
    """One output tensor: its key and layout, the source tensor it is made from (none for routers), and how."""

    key: str
    info: TensorInfo
    source: str | None
    make: Callable[[torch.Tensor | None], torch.Tensor]


def upcycle(
    source: str,
    output_dir: str,
    num_experts: int = 8,
    top_k: int = 2,
    init: ExpertInit | str = DEFAULT_INIT,
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> UpcycleResult:
    """Turn the dense model at `source` into an MoE with `num_experts` experts, `top_k` per token, in `output_dir`.

    Args:
        source: a local model folder (safetensors weights) or a hub name. Supported: Qwen3 -> Qwen3-MoE, Llama and
            Mistral -> Mixtral, InternVL with a Qwen3 language model -> InternVL with a Qwen3-MoE one.
        output_dir: where to write the MoE model (created; must not hold a model unless `overwrite`).
        num_experts, top_k: N experts per layer, K of them per token (the paper: 8 and 2).
        init: expert and router initialization: an `ExpertInit` (kind, `noise_std`, `drop_ratio`, `router_std`,
            `seed`), or a kind's name with its default settings: `noise` (default), `copy` or `drop`. See
            `trl_moe_grpo.upcycle.init` for the trade-offs and why the default is not `copy` (identical experts give
            MoE-GRPO no learning signal). The result does not depend on the source's sharding.
        max_shard_size: largest output shard (`"5GB"`, `"500MB"` or bytes). Memory does not depend on it.
        overwrite: replace a model already in `output_dir`.
        progress: show a progress bar, shard by shard.

    Raises:
        MoEGRPOError: unsupported source (the message lists the supported ones), pickle-only weights, an incomplete
            checkpoint, bad sizes or options. All are raised before anything is written.
    """
    expert_init = resolve_init(init)
    expert_init.require_computed("`upcycle`")
    max_shard_bytes = parse_size(max_shard_size)
    dense = load_source(source)
    moe_config = dense.target.moe_config(dense.config, num_experts, top_k)
    checkpoint = SourceCheckpoint(dense.folder)
    jobs = plan(checkpoint, dense.target, dense.config.get_text_config(), num_experts, expert_init)
    prepare_output(dense.folder, output_dir, overwrite)

    shards = write_shards(checkpoint, split_into_shards(jobs, max_shard_bytes), output_dir, progress)
    moe_config.save_pretrained(output_dir)
    copied = copy_processing(dense.folder, output_dir, dense.target.is_vision_language)
    return UpcycleResult(
        output_dir=output_dir,
        conversion=dense.target.describe(),
        architecture=dense.target.architecture,
        shards=shards,
        source_bytes=checkpoint.nbytes(),
        output_bytes=sum(os.path.getsize(os.path.join(output_dir, s)) for s in shards),
        copied=copied,
        report=compare(dense.config, moe_config),
    )


def plan(
    checkpoint: SourceCheckpoint, target: Target, text: PretrainedConfig, num_experts: int, init: ExpertInit
) -> list[Job]:
    """Every output tensor, in source order, from the headers alone; raises on anything that does not fit."""
    hidden, intermediate = text.hidden_size, text.intermediate_size
    shapes = {"gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
    jobs, seen = [], set()
    for key, (_, info) in checkpoint.tensors.items():
        match = DENSE_MLP_KEY.match(key)
        if match is None:
            jobs.append(Job(key, info, key, _unchanged))
            continue
        prefix, layer, proj = match["prefix"], int(match["layer"]), match["proj"]
        target.check_prefix(key, prefix)
        if match["kind"] != "weight":
            raise MoEGRPOError(f"`{key}`: the dense MLP has a {match['kind']}; MoE experts have weights only.")
        if info.shape != shapes[proj]:
            raise MoEGRPOError(
                f"`{key}` has shape {info.shape}, but the config's hidden_size={hidden} and intermediate_size="
                f"{intermediate} imply {shapes[proj]}: config and weights disagree."
            )
        seen.add((layer, proj))
        for expert in range(num_experts):
            expert_key = target.text.expert_key(prefix, layer, expert, proj)
            make = functools.partial(
                init.expert, proj=proj, expert_key=expert_key, neuron_key=f"{prefix}layers.{layer}.experts.{expert}"
            )
            jobs.append(Job(expert_key, info, key, make))
        if proj == "gate":
            router_key = target.text.router_key(prefix, layer)
            dtype = TORCH_DTYPES[info.dtype]
            make = functools.partial(_router, init, num_experts, hidden, dtype, router_key)
            jobs.append(Job(router_key, TensorInfo(info.dtype, (num_experts, hidden)), None, make))

    layers = text.num_hidden_layers
    missing = [f"layer {i} {proj}_proj" for i in range(layers) for proj in PROJECTIONS if (i, proj) not in seen]
    extra = sorted({f"layer {i}" for i, _ in seen if i >= layers})
    if missing or extra:
        raise MoEGRPOError(
            f"The checkpoint in {checkpoint.folder!r} does not match its config's {layers} dense MLP layers "
            f"(missing: {', '.join(missing[:6]) or 'none'}; beyond the last layer: {', '.join(extra[:6]) or 'none'})."
            " Is it complete, and a dense model?"
        )
    keys = [job.key for job in jobs]
    if len(set(keys)) != len(keys):
        raise MoEGRPOError(f"The checkpoint in {checkpoint.folder!r} already holds expert or router weights.")
    return jobs


def split_into_shards(jobs: list[Job], max_shard_bytes: int) -> list[list[Job]]:
    """Consecutive jobs in shards of at most `max_shard_bytes` (a larger single tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for job in jobs:
        if current and size + job.info.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(job)
        size += job.info.nbytes
    return shards + [current] if current else shards


def write_shards(checkpoint: SourceCheckpoint, shards: list[list[Job]], output_dir: str, progress: bool) -> list[str]:
    """Stream every shard to disk; write the index when there are several. Returns the shard file names."""
    from tqdm.auto import tqdm

    count = len(shards)
    names = (
        [SAFE_WEIGHTS_NAME]
        if count == 1
        else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    )
    total = sum(job.info.nbytes for shard in shards for job in shard)
    weight_map, cached_key, cached = {}, None, None
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar:
        for name, jobs in zip(names, shards):
            bar.set_description(f"Upcycling {name}")
            # Larger elements first, as safetensors orders them, so every tensor starts aligned to its element size.
            jobs = sorted(jobs, key=lambda job: -DTYPE_SIZES[job.info.dtype])
            with StreamingShard(os.path.join(output_dir, name), [(job.key, job.info) for job in jobs]) as shard:
                for job in jobs:
                    if job.source is not None and job.source != cached_key:
                        # Experts of one MLP matrix are consecutive: the matrix is read once for all of them.
                        cached_key, cached = job.source, checkpoint.read(job.source)
                    shard.write(job.key, job.make(cached if job.source is not None else None))
                    weight_map[job.key] = name
                    bar.update(job.info.nbytes)
    if count > 1:
        parameters = sum(math.prod(job.info.shape) for shard in shards for job in shard)
        write_index(output_dir, weight_map, total_parameters=parameters, total_size=total)
    return names


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _router(init: ExpertInit, num_experts: int, hidden: int, dtype: torch.dtype, key: str, _: None) -> torch.Tensor:
    return init.router(num_experts, hidden, dtype, key)


def prepare_output(source_folder: str, output_dir: str, overwrite: bool) -> None:
    """Create `output_dir`; refuse to write into the source or over a model unless `overwrite`."""
    if os.path.realpath(source_folder) == os.path.realpath(output_dir):
        raise MoEGRPOError("The output folder is the source folder: choose another one.")
    os.makedirs(output_dir, exist_ok=True)
    weights = [n for n in os.listdir(output_dir) if n.endswith(".safetensors") or n == SAFE_WEIGHTS_INDEX_NAME]
    if weights and not overwrite:
        raise MoEGRPOError(
            f"{output_dir!r} already holds model weights ({', '.join(sorted(weights)[:3])}...). Choose an empty "
            "folder, or pass overwrite=True (`--overwrite`) to replace them."
        )
    for name in weights:
        os.remove(os.path.join(output_dir, name))


def copy_processing(source_folder: str, output_dir: str, vision_language: bool) -> list[str]:
    """Copy the processor (vision-language) or tokenizer, with its chat template, and the generation config."""
    from transformers import AutoProcessor, AutoTokenizer, GenerationConfig

    copied = []
    name, loader = ("processor", AutoProcessor) if vision_language else ("tokenizer", AutoTokenizer)
    try:
        loader.from_pretrained(source_folder, trust_remote_code=False).save_pretrained(output_dir)
        copied.append(name)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as error:
        warnings.warn(
            f"No {name} could be loaded from {source_folder!r} ({error}); the upcycled model has none. Copy the "
            f"{name} files over yourself.",
            stacklevel=3,
        )
    try:
        GenerationConfig.from_pretrained(source_folder).save_pretrained(output_dir)
        copied.append("generation_config")
    except OSError:
        pass  # the source has none: from_pretrained derives one from the config, as it did for the source
    return copied


def parse_size(size: int | str) -> int:
    """`"2GB"` -> 2_000_000_000 bytes (also KB, MB, TB and KiB, MiB, GiB, TiB); an int is bytes."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(size)
        if match is None:
            raise MoEGRPOError(f"max_shard_size={size!r}: write it like '2GB', '500MB' or a number of bytes.")
        value = int(float(match[1]) * _UNITS[match[2].upper()])
    if value <= 0:
        raise MoEGRPOError(f"max_shard_size={size!r}: it must be positive.")
    return value
