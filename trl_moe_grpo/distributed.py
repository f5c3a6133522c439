"""Start-up of distributed runs on CPU (DeepSpeed over gloo), and a record of what actually ran.

On CPU, accelerate can silently start one process or leave DeepSpeed off, so a finished run proves nothing: the
training script writes `run_info.json` when asked (`write_run_info`), and tests read it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

RUN_INFO_FILE = "run_info.json"


def skip_deepspeed_shm_comm_build() -> None:
    """Keep DeepSpeed on CPU from compiling its shared-memory all-reduce op when it starts up.

    On DeepSpeed's CPU accelerator, its torch communication backend builds the `deepspeed_shm_comm` C++ extension at
    distributed start-up: ~100 s the first time on a 2-core machine. Only DeepSpeed inference's
    `inference_all_reduce` uses it; training's collectives go through torch.distributed (gloo) either way. Marking
    the op incompatible skips the build. Must run before DeepSpeed's communication starts: parsing training
    arguments that name a DeepSpeed config can start it, so the training script's parser calls this first.
    """
    from accelerate.utils import is_deepspeed_available

    # accelerate's check, not `find_spec`: a folder named `deepspeed` on `sys.path` is not the package.
    if not is_deepspeed_available():
        return
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def start_deepspeed_comm() -> None:
    """Start DeepSpeed's communication layer before a ZeRO-3 model loads, where `use_cpu` left it off.

    Under a ZeRO-3 config `from_pretrained` partitions the weights as it loads them (`deepspeed.zero.Init`) and takes
    the world size from `deepspeed.comm`. On GPUs accelerate starts it with the process group; with `use_cpu`
    (DeepSpeed on CPU) it starts only torch.distributed (gloo), so DeepSpeed would count one process and fail its
    batch-size check (`16 != 8 * 1 * 1`). Started here, it reuses the gloo process group. A no-op without ZeRO-3.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    import deepspeed

    if not deepspeed.comm.is_initialized():
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        deepspeed.init_distributed(dist_backend=backend)


def run_info(trainer) -> dict[str, Any]:
    """What ran: world size, distributed type, backend, device, the model's wrapper class and the ZeRO stage."""
    accelerator = trainer.accelerator
    wrapped = trainer.model_wrapped
    return {
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "backend": accelerator.state.backend,
        "device": str(accelerator.device),
        "model_wrapped": type(wrapped).__name__,
        "zero_stage": wrapped.zero_optimization_stage() if hasattr(wrapped, "zero_optimization_stage") else None,
    }


def write_run_info(trainer, output_dir: str) -> dict[str, Any]:
    """Write `run_info.json` (see `run_info`) to `output_dir`; return what it holds."""
    info = run_info(trainer)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, RUN_INFO_FILE), "w") as f:
        json.dump(info, f, indent=1)
    return info
