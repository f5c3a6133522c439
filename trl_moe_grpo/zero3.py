"""DeepSpeed ZeRO-3 helper: whole parameters for a forward that runs outside the DeepSpeed engine."""

from __future__ import annotations

import contextlib

import torch


def gathered_parameters(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """All of `model`'s parameters, on every rank, while open, where ZeRO-3 partitioned them; else a no-op.

    Under a ZeRO-3 config `from_pretrained` partitions the weights as they load, and before `trainer.train()` builds
    the DeepSpeed engine no hook gathers them for a forward (calibration, a before-training evaluation). Every rank
    must enter it and run the same forwards. TRL gathers the whole model the same way for generation
    (`ds3_gather_for_generation`).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))
