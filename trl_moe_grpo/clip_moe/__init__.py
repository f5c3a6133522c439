"""CLIP-MoE image classification trained with MoE-GRPO (the paper's Tables 2-3).

- `modeling.py`   CLIP-MoE: transformers' CLIP with MoE MLPs in the vision encoder (registered with the Auto classes)
- `upcycle.py`    CLIP -> CLIP-MoE in memory (`copy`, `noise`, `drop` experts)
- `multiplet.py`  Diversified Multiplet Upcycling (the CLIP-MoE paper's experts from multistage contrastive learning)
- `convert.py`    a saved CLIP folder -> a saved CLIP-MoE folder (either of the two above)
- `contrastive.py` CLIP's contrastive loss and a brief contrastive pre-training
- `classify.py`   zero-shot classification: class-prompt embeddings, image logits, datasets to pixel values
- `rewards.py`    the classification reward and group-relative advantages
- `config.py`     `CLIPMoEGRPOConfig` (MoE-GRPO) and `CLIPDetFTConfig` (Det-FT)
- `trainer.py`    `CLIPMoEGRPOTrainer` and `CLIPDetFTTrainer`, `transformers.Trainer` subclasses
- `evaluation.py` top-1 accuracy per dataset, cross-dataset and shifted-domain tables
- `images.py`     generated image-caption and classification data of the miniature

The tiny CLIP of the tests is built by `trl_moe_grpo.testing.clip`.
"""

from . import modeling  # registers the CLIP-MoE classes with AutoConfig / AutoModel
from .config import CLIPDetFTConfig, CLIPMoEGRPOConfig
from .convert import CLIPUpcycleResult, upcycle_clip
from .evaluation import evaluate_datasets, zero_shot_accuracy
from .modeling import (
    CLIPMoeConfig,
    CLIPMoeExperts,
    CLIPMoeModel,
    CLIPMoeSparseMoeBlock,
    CLIPMoeTopKRouter,
    CLIPMoeVisionConfig,
    CLIPMoeVisionModel,
    vision_encoder,
)
from .multiplet import diversified_multiplet_upcycle
from .trainer import CLIPDetFTTrainer, CLIPMoEGRPOTrainer
from .upcycle import upcycle_clip_model

__all__ = [
    "CLIPDetFTConfig",
    "CLIPDetFTTrainer",
    "CLIPMoEGRPOConfig",
    "CLIPMoEGRPOTrainer",
    "CLIPMoeConfig",
    "CLIPMoeExperts",
    "CLIPMoeModel",
    "CLIPMoeSparseMoeBlock",
    "CLIPMoeTopKRouter",
    "CLIPMoeVisionConfig",
    "CLIPMoeVisionModel",
    "CLIPUpcycleResult",
    "diversified_multiplet_upcycle",
    "evaluate_datasets",
    "modeling",
    "upcycle_clip",
    "upcycle_clip_model",
    "vision_encoder",
    "zero_shot_accuracy",
]
