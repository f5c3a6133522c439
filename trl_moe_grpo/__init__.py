"""trl-moe-grpo: MoE-GRPO for TRL, reinforcement learning over the expert routing of Mixture-of-Experts models.

Where the method's ideas live:

- sampled routing ............ `routing/sampling.py` (Gumbel-top-K), driven by `routing/controller.py`
- routing replay ............. `routing/controller.py` (replay mode) and `routing/traces.py` (the trace layout)
- Token-GRPO ................. TRL's token loss, computed under replay: `grpo_trainer.py`
- Gate-GRPO .................. `losses.py` (`set_log_prob`, `clipped_objective`), added in `grpo_trainer.py`
- modality-aware guidance .... `guidance.py` (statistics, masks), applied by the controller's sampler

Around them: the fine-tuning baselines and routing schemes the method is compared with (`sft.py`,
`routing/assignment.py`), the routers' own learning rate (`optim.py`), and the routing analyses
(`routing_analysis.py`).
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
    "MoEGRPOConfig": "grpo_config",
    "MoEGRPOError": "errors",
    "MoEGRPOTrainer": "grpo_trainer",
    "MoESFTConfig": "sft",
    "MoESFTTrainer": "sft",
    "RoutingController": "routing",
    "ModalityStatistics": "guidance",
    "upcycle": "upcycle",
}

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
    "MoESFTConfig",
    "MoESFTTrainer",
    "RoutingController",
    "__version__",
    "upcycle",
]

if TYPE_CHECKING:
    from .clip_moe import CLIPDetFTConfig, CLIPDetFTTrainer, CLIPMoEGRPOConfig, CLIPMoEGRPOTrainer, CLIPMoeModel
    from .errors import MoEGRPOError
    from .grpo_config import MoEGRPOConfig
    from .grpo_trainer import MoEGRPOTrainer
    from .guidance import ModalityStatistics
    from .routing import RoutingController
    from .sft import MoESFTConfig, MoESFTTrainer
    from .upcycle import upcycle


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'trl_moe_grpo' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
