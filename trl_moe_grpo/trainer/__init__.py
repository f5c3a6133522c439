"""The trainers, laid out like TRL's `trl/trainer/`: a config and a trainer per method, and what they share.

- `grpo_config.py`, `grpo_trainer.py`: `MoEGRPOConfig`, `MoEGRPOTrainer` (the method: Token-GRPO under replay and
  Gate-GRPO, on TRL's `GRPOTrainer`);
- `sft_config.py`, `sft_trainer.py`: `MoESFTConfig`, `MoESFTTrainer` (the fine-tuning baselines, on TRL's
  `SFTTrainer`);
- `common.py`: what both add to their TRL trainer in the same way; `optim.py`: the routers' own learning rate;
- `replay_state.py`: `ReplayState`, the rollout trace's hand-off from generation to the loss, and `ActiveRouting`,
  which routing is active now (`MoEGRPOTrainer`);
- `eval_routing.py`: the routing measured during `trainer.evaluate()`; `callbacks.py`: `MoEReportCallback`, the
  before/after report.
"""

from .callbacks import MoEReportCallback
from .grpo_config import MoEGRPOConfig
from .grpo_trainer import MoEGRPOTrainer
from .sft_config import MoESFTConfig
from .sft_trainer import MoESFTTrainer

__all__ = ["MoEGRPOConfig", "MoEGRPOTrainer", "MoEReportCallback", "MoESFTConfig", "MoESFTTrainer"]
