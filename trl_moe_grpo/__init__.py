"""trl-moe-grpo: MoE-GRPO for TRL, reinforcement learning over the expert routing of Mixture-of-Experts models.

Where the method's ideas live:

- sampled routing ............ `routing/sampling.py` (Gumbel-top-K), driven by `routing/controller.py`
- routing replay ............. `routing/controller.py` (replay mode) and `routing/traces.py` (the trace layout)
- Token-GRPO ................. TRL's token loss, computed under replay: `grpo_trainer.py`
- Gate-GRPO .................. `losses.py` (`set_log_prob`, `clipped_objective`), added in `grpo_trainer.py`
- modality-aware guidance .... expert masks applied by the controller's sampler (`RoutingController.set_expert_masks`)
"""

__version__ = "0.1.0"

from .errors import MoEGRPOError
from .grpo_config import MoEGRPOConfig
from .grpo_trainer import MoEGRPOTrainer
from .routing import RoutingController

__all__ = ["MoEGRPOConfig", "MoEGRPOError", "MoEGRPOTrainer", "RoutingController", "__version__"]
