"""trl-moe-grpo: MoE-GRPO for TRL, reinforcement learning over the expert routing of Mixture-of-Experts models.

Where the method's ideas live:

- sampled routing ............ `routing/sampling.py` (Gumbel-top-K), driven by `routing/controller.py`
- routing replay ............. `routing/controller.py` (replay mode) and `routing/traces.py` (the trace layout)
- Token-GRPO ................. TRL's token loss, computed under replay: `trainer/grpo_trainer.py`
- Gate-GRPO .................. `losses.py` (`set_log_prob`, `clipped_objective`), added in `trainer/grpo_trainer.py`
- modality-aware guidance .... `guidance.py` (statistics, masks), applied by the controller's sampler

Around them: the trainers (`trainer/`, laid out like TRL's), the fine-tuning baselines and routing schemes the method
is compared with (`trainer/sft_trainer.py`, `routing/assignment.py`), the routing analyses (`analysis/`), upcycling
dense models (`upcycle/`), CLIP-MoE (`clip_moe/`), vLLM rollouts (`vllm_routing/`) and the command line
(`commands/`). `docs/design.md` is the map.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names and the modules they live in: imported on first use, so `trl-moe-grpo --help` stays fast.
_LAZY = {
    "CLIPDetFTConfig": "clip_moe",
    "CLIPDetFTTrainer": "clip_moe",
    "CLIPMoEGRPOConfig": "clip_moe",
    "CLIPMoEGRPOTrainer": "clip_moe",
    "CLIPMoeModel": "clip_moe",
    "MoEGRPOConfig": "trainer",
    "MoEGRPOError": "errors",
    "MoEGRPOTrainer": "trainer",
    "MoEReportCallback": "trainer",
    "MoESFTConfig": "trainer",
    "MoESFTTrainer": "trainer",
    "RoutingController": "routing",
    "ModalityStatistics": "guidance",
}
# Subpackages reachable as attributes without an explicit import: `trl_moe_grpo.upcycle` is always the subpackage
# (its conversion function is `trl_moe_grpo.upcycle.upcycle`).
_SUBPACKAGES = {"upcycle"}

__all__ = [
    "CLIPDetFTConfig",
    "CLIPDetFTTrainer",
    "CLIPMoEGRPOConfig",
    "CLIPMoEGRPOTrainer",
    "CLIPMoeModel",
    "ModalityStatistics",
    "MoEGRPOConfig",
    "MoEGRPOError",
    "MoEGRPOTrainer",
    "MoEReportCallback",
    "MoESFTConfig",
    "MoESFTTrainer",
    "RoutingController",
    "__version__",
    "upcycle",
]

if TYPE_CHECKING:
    from . import upcycle
    from .clip_moe import CLIPDetFTConfig, CLIPDetFTTrainer, CLIPMoEGRPOConfig, CLIPMoEGRPOTrainer, CLIPMoeModel
    from .errors import MoEGRPOError
    from .guidance import ModalityStatistics
    from .routing import RoutingController
    from .trainer import MoEGRPOConfig, MoEGRPOTrainer, MoEReportCallback, MoESFTConfig, MoESFTTrainer


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module 'trl_moe_grpo' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
