"""A tiny dense CLIP built locally: word-level tokenizer, image processor and config.

Nothing is downloaded: the tokenizer's vocabulary is the generated world's words (`clip_moe.images.vocabulary()`), the
weights are random (seeded). `scripts/build_tiny_clip.py` pre-trains one with `clip_moe.contrastive` and saves it
(`bundled/tiny-clip`); the tests use `tiny_clip_moe` (random weights).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from ..clip_moe.images import IMAGE_SIZE, vocabulary
from ..clip_moe.upcycle import upcycle_clip_model
from ..upcycle.init import ExpertInit

SPECIAL_TOKENS = ["<pad>", "<bos>", "<unk>", "<eos>"]  # eos is not 2: CLIP reads eos_token_id=2 as a legacy layout
MAX_TEXT_LENGTH = 12


def build_word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the generated world's vocabulary; every text becomes `<bos> words <eos>`."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=MAX_TEXT_LENGTH,
    )


def build_image_processor() -> CLIPImageProcessor:
    """CLIP's image processor at 32x32, pixels scaled to [-1, 1]."""
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def tiny_clip_config(tokenizer: PreTrainedTokenizerFast, **vision_overrides) -> CLIPConfig:
    """A dense CLIP: 32x32 images in 8x8 patches (17 tokens), vision width 64 x 4 layers, text width 64 x 2 layers."""
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        projection_dim=64,
        hidden_act="quick_gelu",
    )
    vision.update(vision_overrides)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TEXT_LENGTH,
        projection_dim=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def tiny_clip(seed: int = 0, **vision_overrides) -> tuple[CLIPModel, PreTrainedTokenizerFast, CLIPImageProcessor]:
    """A randomly initialized tiny dense CLIP with its tokenizer and image processor."""
    tokenizer = build_word_tokenizer()
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(tokenizer, **vision_overrides)).eval()
    return model, tokenizer, build_image_processor()


def tiny_clip_moe(seed: int = 0, num_experts: int = 4, top_k: int = 2, init: ExpertInit | str | None = None):
    """A tiny CLIP-MoE upcycled in memory from a random tiny CLIP (for tests), with tokenizer and image processor.

    `seed` seeds the dense CLIP; `init` defaults to `noise` of std 0.3 with the same seed.
    """
    dense, tokenizer, image_processor = tiny_clip(seed, num_hidden_layers=2)
    init = ExpertInit("noise", noise_std=0.3, seed=seed) if init is None else init
    model = upcycle_clip_model(dense, num_experts=num_experts, top_k=top_k, init=init)
    return model.eval(), tokenizer, image_processor
