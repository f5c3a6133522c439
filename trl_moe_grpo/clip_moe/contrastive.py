"""CLIP's contrastive loss on image-caption pairs, and a brief pre-training with it (for the bundled tiny CLIP)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import CLIPImageProcessor, CLIPModel, PreTrainedTokenizerBase

from .images import caption_pairs


def tokenize_captions(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], model) -> dict[str, torch.Tensor]:
    """Captions as one padded batch, truncated to what the text tower takes.

    The length is the smaller of the tokenizer's own `model_max_length` and the text tower's position table
    (`text_config.max_position_embeddings`: 77 for OpenAI's CLIP), so real captions longer than the tiny CLIP's never
    overflow either, and every caption is padded to the batch's longest.
    """
    limit = model.config.text_config.max_position_embeddings
    max_length = min(limit, tokenizer.model_max_length or limit)
    return tokenizer(list(captions), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


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
    tokenizer: PreTrainedTokenizerBase,
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
    text = tokenize_captions(tokenizer, captions, model)
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
