"""Safetensors in and out, one tensor at a time: never pickle, never a whole model (or shard) in memory.

Reading uses `safetensors.safe_open` on the source shards: headers for the plan (keys, dtypes, shapes), then one
tensor per read. Writing streams: an upcycled checkpoint's layout is fully known before any data is read (every output
tensor's key, dtype and shape follow from the source's headers), so each output shard's header is written first and
each tensor's bytes are appended as soon as it is computed. The format is safetensors' own: an 8-byte little-endian
header length, the JSON header padded with spaces to a multiple of 8, then the tensors' bytes back to back, in the
header's offset order.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..errors import MoEGRPOError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")

# safetensors dtype names, their sizes in bytes, and the torch dtypes they hold.
DTYPE_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
DTYPE_SIZES.update({"I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1})
TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's place in a checkpoint without its data: safetensors dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)


class SourceCheckpoint:
    """The safetensors shards of a model folder: every key's shard, dtype and shape, and one tensor at a time.

    Args:
        folder: a model folder with `model.safetensors` or `model.safetensors.index.json` and its shards.
    """

    def __init__(self, folder: str):
        self.folder = folder
        index_path = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(folder, SAFE_WEIGHTS_NAME)):
            weight_map = None
        else:
            pickled = [name for name in PICKLE_WEIGHTS if os.path.exists(os.path.join(folder, name))]
            found = f" It has {', '.join(pickled)}: pickle files are never loaded here." if pickled else ""
            raise MoEGRPOError(
                f"No safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}) in {folder!r}.{found} "
                "Load the model once and save it with `save_pretrained` (safetensors is the default) first."
            )
        shards = sorted(set(weight_map.values())) if weight_map else [SAFE_WEIGHTS_NAME]
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise MoEGRPOError(f"Shards {missing} listed in the index of {folder!r} are missing: the copy is partial.")
        self.shards = shards
        # key -> (shard, info), in shard order and, within a shard, in the file's own order.
        self.tensors: dict[str, tuple[str, TensorInfo]] = {}
        for shard in shards:
            with safe_open(os.path.join(folder, shard), framework="pt") as f:
                for key in f.keys():
                    view = f.get_slice(key)
                    self.tensors[key] = (shard, TensorInfo(view.get_dtype(), tuple(view.get_shape())))

    def read(self, key: str) -> torch.Tensor:
        """One tensor. The shard is opened for this read only, so no more than this tensor's pages stay mapped."""
        shard, _ = self.tensors[key]
        with safe_open(os.path.join(self.folder, shard), framework="pt") as f:
            return f.get_tensor(key)

    def nbytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.folder, shard)) for shard in self.shards)


class StreamingShard:
    """One output safetensors file whose keys, dtypes, shapes and order are fixed up front; tensors appended in order.

    Args:
        path: the file to write.
        entries: `(key, info)` in the order the tensors will be written. Put larger element sizes first (as
            safetensors does) so every tensor starts aligned to its element size.
    """

    def __init__(self, path: str, entries: list[tuple[str, TensorInfo]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, info in entries:
            header[key] = {
                "dtype": info.dtype,
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self._pending = list(reversed(entries))
        self._file = open(path, "wb")  # closed by `close`, after the last tensor
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected_key, info = self._pending.pop()
        actual = TensorInfo(_dtype_name(tensor.dtype), tuple(tensor.shape))
        if key != expected_key or actual != info:
            raise MoEGRPOError(
                f"Internal error writing {self.path}: got `{key}` {actual}, the header announced `{expected_key}` "
                f"{info}. Please report this."
            )
        # The tensor's own bytes, no copy beyond making it contiguous: bfloat16 has no numpy type, bytes do.
        self._file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())

    def __enter__(self) -> StreamingShard:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self.close()
        else:  # never leave a truncated shard behind that a loader could mistake for a finished one
            self._file.close()
            os.remove(self.path)

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise MoEGRPOError(
                f"Internal error: {len(self._pending)} tensors announced in {self.path} were not written."
            )


def write_index(folder: str, weight_map: dict[str, str], total_parameters: int, total_size: int) -> None:
    """`model.safetensors.index.json`, as `save_pretrained` writes it."""
    index = {
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _dtype_name(dtype: torch.dtype) -> str:
    for name, torch_dtype in TORCH_DTYPES.items():
        if torch_dtype == dtype:
            return name
    raise MoEGRPOError(f"Tensors of dtype {dtype} cannot be written to safetensors here.")
