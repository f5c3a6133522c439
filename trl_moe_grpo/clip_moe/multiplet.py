"""Diversified Multiplet Upcycling (DMU), the CLIP-MoE paper's initialization, on image-caption pairs.

Followed from the official implementation's README and training scripts (OpenSparseLLMs/CLIP-MoE: `train_mcl.py`, the
`MCL_batch_sampler_DDP` of `dataset.py`, `cluster.ipynb`, `train_moe.py`):

1. **Stage 0** is the dense CLIP itself: its vision MLPs are expert 0.
2. **Clustering** after each stage: every training pair is embedded by that stage's model; k-means splits the image
   embeddings into `clusters_per_modality` clusters and the text embeddings likewise, and the pair's cluster is
   `text_cluster * clusters_per_modality + image_cluster` (the official notebook's 3 x 3 = 9). A pair's pseudo-label
   accumulates the clusters of every stage so far (pairs share a pseudo-label when they shared a cluster at every
   stage).
3. **Multistage contrastive learning**: stage `s >= 1` starts again from the dense CLIP and fine-tunes only its MLPs
   with CLIP's contrastive loss, each batch drawn from a single pseudo-label group (the official batch sampler: every
   group is shuffled and cut to whole batches, batches go round the groups), so a pair's negatives are the pairs the
   earlier stages could not tell apart. Here only the *vision* MLPs train (the official `--lock-text` option): the
   CLIP-MoE of this package keeps CLIP's dense text tower, which every expert must fit.
4. **CLIP-MoE**: expert `s` of every vision MoE layer is stage `s`'s MLP of that layer; everything else is the dense
   CLIP's. Then the routers alone are fine-tuned (the official `--lock-except-gate` default) with the contrastive loss
   plus the load-balancing loss on the routed sets.

`num_experts` stages give `num_experts` experts. What is not the official set-up: the data (the caller's pairs, in
the miniature generated ones); the k-means (plain Lloyd iterations with k-means++ seeding instead of scikit-learn's
mini-batch k-means); the optimizer (AdamW at a constant learning rate without weight decay or warm-up, no mixed
precision; the official script uses a cosine schedule with warm-up and weight decay 0.2); the logit scale (the dense
CLIP's, where the official script resets it to 100); the loss (`contrastive.contrastive_loss`, CLIP's loss with soft
targets over identical captions, which generated captions need); the text tower (dense, no text experts); and the
size of everything.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from ..errors import MoEGRPOError
from ..losses import routed_load_balancing_loss
from ..routing import RoutingController
from ..upcycle.init import ExpertInit
from .contrastive import contrastive_loss, tokenize_captions
from .modeling import CLIPMoeModel, vision_encoder
from .upcycle import upcycle_clip_model


@dataclass
class MultipletReport:
    """What `diversified_multiplet_upcycle` did: per stage, the number of pseudo-label groups and batches trained."""

    groups: list[int] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    router_steps: int = 0


def kmeans(features: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 50) -> torch.Tensor:
    """Cluster ids `[rows]` of k-means on `features` (k-means++ seeding, then Lloyd iterations)."""
    rows = features.shape[0]
    if rows < k:
        raise MoEGRPOError(f"k-means with k={k} needs at least {k} rows, got {rows}.")
    centers = [features[torch.randint(rows, (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):
        distance = torch.cdist(features, torch.stack(centers)).min(-1).values.pow(2)
        centers.append(features[torch.multinomial(distance / distance.sum(), 1, generator=generator)].squeeze(0))
    centers = torch.stack(centers)
    labels = torch.cdist(features, centers).argmin(-1)
    for _ in range(iterations):
        for c in range(k):
            members = labels == c
            if members.any():
                centers[c] = features[members].mean(0)
        new = torch.cdist(features, centers).argmin(-1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def group_batches(labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The official MCL batch sampler: each group shuffled and cut to whole batches; batches go round the groups."""
    queues = []
    for group in torch.unique(labels):
        members = (labels == group).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        whole = len(members) // batch_size * batch_size
        if whole:
            queues.append(list(members[:whole].split(batch_size)))
    batches = []
    while any(queues):
        for queue in queues:
            if queue:
                batches.append(queue.pop(0))
    return batches


@torch.no_grad()
def _embed(model, pixels, text, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    images, texts = [], []
    for start in range(0, len(pixels), batch_size):
        rows = slice(start, start + batch_size)
        images.append(model.get_image_features(pixel_values=pixels[rows]).pooler_output)
        texts.append(
            model.get_text_features(
                input_ids=text["input_ids"][rows], attention_mask=text["attention_mask"][rows]
            ).pooler_output
        )
    return F.normalize(torch.cat(images), dim=-1), F.normalize(torch.cat(texts), dim=-1)


def _clusters(model, pixels, text, k: int, generator: torch.Generator) -> torch.Tensor:
    image, caption = _embed(model.eval(), pixels, text)
    return kmeans(caption, k, generator) * k + kmeans(image, k, generator)


def diversified_multiplet_upcycle(
    dense: CLIPModel,
    tokenizer,
    image_processor,
    images: list,
    captions: list[str],
    num_experts: int = 4,
    top_k: int = 2,
    *,
    clusters_per_modality: int = 3,
    stage_epochs: float = 1.0,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    router_epochs: float = 1.0,
    router_learning_rate: float = 1e-2,
    router_aux_loss_coef: float = 0.01,
    seed: int = 0,
) -> tuple[CLIPMoeModel, MultipletReport]:
    """A CLIP-MoE whose vision experts come from `num_experts` MCL stages of `dense` on (`images`, `captions`).

    Args:
        dense: the dense `CLIPModel` (not changed).
        tokenizer, image_processor: its tokenizer and image processor.
        images, captions: the image-caption pairs MCL and the router fine-tune train on.
        num_experts: MCL stages, hence experts per vision layer (the paper's released CLIP-MoE: 4, top-2).
        top_k: experts per token.
        clusters_per_modality: k of the image and of the text k-means per stage (official: 3, so 9 clusters).
        stage_epochs: epochs of each MCL stage (official: 1).
        batch_size: pairs per batch, in MCL and in the router fine-tune.
        learning_rate: AdamW learning rate of the MLPs in MCL.
        router_epochs, router_learning_rate, router_aux_loss_coef: the router fine-tune.
        seed: seed of the k-means, the batch order and the routers.

    Returns:
        `(model, report)`: the CLIP-MoE (eval mode) and what each stage did.
    """
    if len(images) != len(captions):
        raise MoEGRPOError(f"{len(images)} images and {len(captions)} captions: give one caption per image.")
    if len(images) < batch_size:
        raise MoEGRPOError(f"{len(images)} pairs are fewer than one batch ({batch_size}): pass more pairs.")
    generator = torch.Generator().manual_seed(seed)
    pixels = image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    text = tokenize_captions(tokenizer, captions, dense)
    caption_ids = torch.tensor([hash(c) for c in captions])
    report = MultipletReport()

    stages = [dense]
    pseudo = _clusters(dense, pixels, text, clusters_per_modality, generator)
    for _ in range(1, num_experts):
        stage = copy.deepcopy(dense).train()
        for name, parameter in stage.named_parameters():
            parameter.requires_grad_(name.startswith("vision_model.") and ".mlp." in name)
        optimizer = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=learning_rate)
        batches = []
        for _ in range(math.ceil(stage_epochs)):
            batches += group_batches(pseudo, batch_size, generator)
        batches = batches[: max(1, round(stage_epochs * len(batches) / math.ceil(stage_epochs)))]
        if not batches:
            raise MoEGRPOError(
                f"After {len(stages)} MCL stages every pseudo-label group is smaller than a batch ({batch_size}): "
                "pass more pairs, a smaller batch_size or fewer experts."
            )
        report.groups.append(int(torch.unique(pseudo).numel()))
        report.batches.append(len(batches))
        for rows in batches:
            loss = contrastive_loss(stage, pixels[rows], text["input_ids"][rows], text["attention_mask"][rows],
                                    caption_ids[rows])  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        stages.append(stage.eval())
        # Accumulate: pairs share a pseudo-label only if they shared a cluster at every stage.
        current = _clusters(stage, pixels, text, clusters_per_modality, generator)
        pseudo = torch.unique(torch.stack([pseudo, current], -1), dim=0, return_inverse=True)[1]

    moe = upcycle_clip_model(dense, num_experts, top_k, ExpertInit("copy", seed=seed))
    for layer, block in enumerate(vision_encoder(moe).layers):
        experts = block.mlp.experts
        with torch.no_grad():
            for e, stage in enumerate(stages):
                mlp = stage.vision_model.encoder.layers[layer].mlp
                experts.fc1[e].copy_(mlp.fc1.weight)
                experts.fc1_bias[e].copy_(mlp.fc1.bias)
                experts.fc2[e].copy_(mlp.fc2.weight)
                experts.fc2_bias[e].copy_(mlp.fc2.bias)
    report.router_steps = _fine_tune_routers(
        moe,
        pixels,
        text,
        caption_ids,
        batch_size,
        router_epochs,
        router_learning_rate,
        router_aux_loss_coef,
        generator,
    )
    return moe.eval(), report


def _fine_tune_routers(moe, pixels, text, caption_ids, batch_size, epochs, lr, aux_coef, generator) -> int:
    """Routers only: contrastive loss plus the load-balancing loss on the routed sets, stock top-K routing."""
    controller = RoutingController(vision_encoder(moe))
    routers = {id(p) for p in controller.router_parameters()}
    for parameter in moe.parameters():
        parameter.requires_grad_(id(parameter) in routers)
    optimizer = torch.optim.AdamW(controller.router_parameters(), lr=lr)
    steps = max(1, round(epochs * len(pixels) / batch_size))
    moe.train()
    try:
        for _ in range(steps):
            rows = torch.randint(0, len(pixels), (batch_size,), generator=generator)
            with controller.training_routing("topk") as routes:
                loss = contrastive_loss(moe, pixels[rows], text["input_ids"][rows], text["attention_mask"][rows],
                                        caption_ids[rows])  # fmt: skip
                captures = routes.captures()
            log_probs = torch.stack([a.selection_log_probs(c.logits) for a, c in zip(controller.adapters, captures)])
            dispatched = torch.stack([c.dispatched for c in captures])
            balance = routed_load_balancing_loss(
                log_probs.exp(), dispatched, captures[0].valid, controller.num_experts
            )
            optimizer.zero_grad(set_to_none=True)
            (loss + aux_coef * balance).backward()
            optimizer.step()
    finally:
        controller.remove()
        for parameter in moe.parameters():
            parameter.requires_grad_(True)
    return steps
