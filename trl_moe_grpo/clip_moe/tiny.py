"""A tiny dense CLIP built locally: word-level tokenizer, image processor, config, and brief contrastive pre-training.

Nothing is downloaded: the tokenizer's vocabulary is the generated world's words (`images.vocabulary()`), the weights
are random (seeded) until `pretrain_contrastive` trains them on `images.caption_pairs`. `scripts/build_tiny_clip.py`
runs the whole recipe and saves the result (`bundled/tiny-clip`); the tests use `tiny_clip_moe` (random weights).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from .images import IMAGE_SIZE, caption_pairs, vocabulary

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


def tiny_clip_moe(seed: int = 0, num_experts: int = 4, top_k: int = 2, init: str = "noise", noise_std: float = 0.3):
    """A tiny CLIP-MoE upcycled in memory from a random tiny CLIP (for tests), with tokenizer and image processor."""
    from .upcycle import upcycle_clip_model

    dense, tokenizer, image_processor = tiny_clip(seed, num_hidden_layers=2)
    model = upcycle_clip_model(dense, num_experts=num_experts, top_k=top_k, init=init, noise_std=noise_std, seed=seed)
    return model.eval(), tokenizer, image_processor


def contrastive_loss(model, pixel_values, input_ids, attention_mask, caption_ids) -> torch.Tensor:
    """CLIP's symmetric contrastive loss with soft targets: an image's target is spread evenly over the batch's
    captions equal to its own (`caption_ids` equal), and likewise for captions."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(-1, keepdim=True)
    return 0.5 * (F.cross_entropy(out.logits_per_image, targets) + F.cross_entropy(out.logits_per_text, targets))


@dataclass
class PretrainReport:
    """What `pretrain_contrastive` did: steps, final loss, seconds."""

    steps: int
    final_loss: float
    seconds: float


def pretrain_contrastive(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: CLIPImageProcessor,
    num_pairs: int = 40_000,
    steps: int = 1500,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    warmup_steps: int = 100,
    seed: int = 0,
    log_every: int = 100,
) -> PretrainReport:
    """CLIP's symmetric contrastive loss on generated image-caption pairs, AdamW with warm-up and cosine decay.

    Many pairs share a caption (`"a photo of a red circle"`), so the targets are soft: an image's target is spread
    evenly over the batch's captions equal to its own (and likewise for captions), instead of CLIP's one-hot diagonal,
    which would push apart identical texts.
    """
    images, captions = caption_pairs(num_pairs, seed)
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    text = tokenizer(captions, padding="max_length", max_length=MAX_TEXT_LENGTH, return_tensors="pt")
    caption_ids = torch.tensor([hash(c) for c in captions])  # equal captions share an id within this run
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    start, loss = time.time(), torch.tensor(float("nan"))
    for step in range(steps):
        rows = torch.randint(0, num_pairs, (batch_size,), generator=generator)
        loss = contrastive_loss(
            model, pixels[rows], text["input_ids"][rows], text["attention_mask"][rows], caption_ids[rows]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"pretrain step {step + 1}/{steps}: loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    return PretrainReport(steps=steps, final_loss=float(loss.item()), seconds=time.time() - start)
