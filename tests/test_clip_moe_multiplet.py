"""Diversified Multiplet Upcycling: k-means, the MCL batch sampler, experts from the MCL stages, the command."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import AutoModel

from trl_moe_grpo.cli import main
from trl_moe_grpo.clip_moe.contrastive import tokenize_captions
from trl_moe_grpo.clip_moe.images import caption_pairs
from trl_moe_grpo.clip_moe.multiplet import diversified_multiplet_upcycle, group_batches, kmeans
from trl_moe_grpo.testing.clip import MAX_TEXT_LENGTH, tiny_clip

torch.set_num_threads(1)


def test_kmeans_finds_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    points = torch.cat([c + 0.3 * torch.randn(40, 2, generator=generator) for c in centers])
    labels = kmeans(points, 3, torch.Generator().manual_seed(1))
    for block in labels.view(3, 40):
        assert block.unique().numel() == 1
    assert labels.view(3, 40)[:, 0].unique().numel() == 3


def test_mcl_batches_come_from_one_group_each():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    batches = group_batches(labels, 3, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [3] * 6  # 3 + 2 + 1 whole batches; leftovers dropped
    assert all(labels[b].unique().numel() == 1 for b in batches)
    assert [int(labels[b[0]]) for b in batches] == [0, 1, 2, 0, 1, 0]  # round the groups
    assert torch.cat(batches).unique().numel() == 18  # no pair twice


def test_experts_are_the_mcl_stages_mlps():
    dense, tokenizer, image_processor = tiny_clip(seed=0, num_hidden_layers=2)
    images, captions = caption_pairs(160, seed=5)
    moe, report = diversified_multiplet_upcycle(
        dense, tokenizer, image_processor, images, captions, num_experts=3, top_k=2, batch_size=8, seed=0
    )
    assert len(report.groups) == len(report.batches) == 2 and report.groups[0] <= 9 and min(report.batches) > 0
    assert report.router_steps > 0
    dense_state = dense.state_dict()
    for layer in range(2):
        mlp = dense.vision_model.encoder.layers[layer].mlp
        experts = moe.vision_model.encoder.layers[layer].mlp.experts
        assert torch.equal(experts.fc1[0], mlp.fc1.weight) and torch.equal(experts.fc2_bias[0], mlp.fc2.bias)
        for e in (1, 2):
            assert not torch.equal(experts.fc1[e], mlp.fc1.weight)
        assert not torch.equal(experts.fc1[1], experts.fc1[2])
    # Everything but the vision MLPs and routers is the dense CLIP's.
    for name, value in moe.state_dict().items():
        if name in dense_state:
            assert torch.equal(value, dense_state[name]), name


def test_multiplet_upcycle_takes_captions_longer_than_the_text_tower():
    """Captions are cut to the text tower's position table (12 in the tiny CLIP), even under a tokenizer without a
    length limit of its own; untruncated they failed with `Unable to create tensor`."""
    dense, tokenizer, image_processor = tiny_clip(seed=0, num_hidden_layers=2)
    tokenizer.model_max_length = int(1e30)  # what tokenizers with no limit say
    images, captions = caption_pairs(64, seed=7)
    long = [" ".join([caption] * 4) for caption in captions]
    assert min(len(ids) for ids in tokenizer(long).input_ids) > MAX_TEXT_LENGTH
    assert tokenize_captions(tokenizer, long, dense)["input_ids"].shape == (64, MAX_TEXT_LENGTH)
    moe, report = diversified_multiplet_upcycle(
        dense, tokenizer, image_processor, images, long, num_experts=2, top_k=1, batch_size=8, seed=0
    )
    assert len(report.groups) == 1 and report.router_steps > 0
    experts = moe.vision_model.encoder.layers[0].mlp.experts
    assert not torch.equal(experts.fc1[0], experts.fc1[1])  # the second stage trained on the long captions


def test_upcycle_command_multiplet(tmp_path, capsys):
    dense, tokenizer, image_processor = tiny_clip(seed=0, num_hidden_layers=2)
    source = tmp_path / "clip"
    for part in (dense, tokenizer, image_processor):
        part.save_pretrained(source)
    images, captions = caption_pairs(600, seed=6)
    Dataset.from_dict({"image": images, "caption": captions}).save_to_disk(str(tmp_path / "pairs"))
    argv = ["upcycle", str(source), "--output", str(tmp_path / "moe"), "--num-experts", "2", "--init", "multiplet"]
    assert main(argv) == 2
    assert "pass `pairs` (`--pairs DATASET`" in capsys.readouterr().err
    assert main([*argv, "--pairs", str(tmp_path / "pairs")]) == 0
    assert "clip -> clip_moe" in capsys.readouterr().out
    model = AutoModel.from_pretrained(tmp_path / "moe")
    assert model.config.vision_config.num_experts == 2
    Dataset.from_dict({"image": images[:4], "text": captions[:4]}).save_to_disk(str(tmp_path / "bad"))
    assert main([*argv, "--pairs", str(tmp_path / "bad"), "--overwrite"]) == 2
    assert "needs `image` and `caption` columns" in capsys.readouterr().err
