"""Modality statistics (paper eq. 7), masks, the statistics file, and masked sampling."""

import json

import pytest
import torch

from trl_moe_grpo import MoEGRPOError, RoutingController
from trl_moe_grpo.guidance import ModalityStatistics, modality_masks
from trl_moe_grpo.routing import TEXT, VISION
from trl_moe_grpo.testing import tiny_moe_model

IDENTITY = {
    "architecture": "Qwen3MoeForCausalLM",
    "num_layers": 1,
    "num_experts": 4,
    "top_k": 2,
    "router_layers": ["g"],
}


def stats_from(text: list[int], vision: list[int], top_k: int = 2) -> ModalityStatistics:
    counts = torch.tensor([[text, vision]])
    return ModalityStatistics(counts=counts, model={**IDENTITY, "num_experts": len(text), "top_k": top_k})


def test_scores_follow_equation_7_by_hand():
    """s_m = N_m / sum N_m, ŝ_m = s_m / (s_t + s_v); an expert nobody chose scores 0 for both."""
    stats = stats_from(text=[0, 2, 4, 4, 0], vision=[6, 3, 1, 0, 0])
    scores = stats.scores()[0]
    # s_v = [.6, .3, .1, 0, 0], s_t = [0, .2, .4, .4, 0]
    torch.testing.assert_close(scores[VISION], torch.tensor([1.0, 0.6, 0.2, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(scores[TEXT], torch.tensor([0.0, 0.4, 0.8, 1.0, 0.0], dtype=torch.float64))


def test_bottom_share_is_masked_per_modality():
    """P=0.5 of N=4 masks the two lowest-scoring experts of each modality."""
    masks = stats_from(text=[0, 2, 4, 4], vision=[6, 3, 1, 0]).masks(0.5)[0]
    assert masks[VISION].tolist() == [True, True, False, False]  # ŝ_v = [1, .6, .2, 0]
    assert masks[TEXT].tolist() == [False, False, True, True]  # ŝ_t = [0, .4, .8, 1]


def test_ties_are_broken_by_expert_id_deterministically():
    scores = torch.zeros(3, 2, 8, dtype=torch.float64)
    masks = modality_masks(scores, 0.25, top_k=2, present=torch.tensor([True, True]))
    assert (~masks).nonzero()[:, 2].reshape(3, 2, 2).tolist() == [[[0, 1]] * 2] * 3
    assert torch.equal(masks, modality_masks(scores, 0.25, top_k=2, present=torch.tensor([True, True])))


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.99])
def test_at_least_top_k_experts_remain(ratio):
    stats = stats_from(text=[5, 1, 0, 3], vision=[0, 2, 9, 1], top_k=2)
    masks = stats.masks(ratio)
    assert masks.sum(-1).min() >= 2
    assert (~masks).sum(-1).max() == min(int(ratio * 4), 2)


def test_a_modality_never_seen_is_not_masked():
    """Text-only calibration data: nothing to rank vision experts by, so vision keeps every expert."""
    masks = stats_from(text=[5, 1, 0, 3], vision=[0, 0, 0, 0]).masks(0.5)
    assert masks[0, VISION].all() and not masks[0, TEXT].all()


def test_file_round_trip_is_json(tmp_path):
    stats = stats_from(text=[0, 2, 4, 4], vision=[6, 3, 1, 0])
    path = tmp_path / "stats.json"
    stats.save(path, 0.5)
    data = json.loads(path.read_text())  # plain JSON: nothing to unpickle
    assert data["layers"][0]["masked"] == {"text": [0, 1], "vision": [2, 3]}
    loaded = ModalityStatistics.load(path)
    assert torch.equal(loaded.counts, stats.counts) and loaded.model == stats.model


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5])
def test_file_round_trip_keeps_the_mask_ratio(tmp_path, ratio):
    """`load` keeps the P `save` wrote: saving again without a ratio writes the same file, masks the same experts."""
    stats = stats_from(text=[0, 2, 4, 4, 1, 7, 3, 5], vision=[6, 3, 1, 0, 2, 2, 9, 4])
    stats.extra = {"dataset": "visual_mc"}
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    stats.save(first, ratio)
    loaded = ModalityStatistics.load(first)
    assert loaded.mask_ratio == ratio and loaded.extra == {"dataset": "visual_mc"}
    assert torch.equal(loaded.masks(), stats.masks(ratio))
    loaded.save(second)
    assert json.loads(second.read_text()) == json.loads(first.read_text())
    with pytest.raises(MoEGRPOError, match="mask_ratio="):
        stats.masks()  # built in memory, never saved: no ratio to fall back on


def test_malformed_or_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MoEGRPOError, match="Cannot read"):
        ModalityStatistics.load(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(MoEGRPOError, match="not a trl-moe-grpo modality statistics file"):
        ModalityStatistics.load(other)


def test_statistics_for_another_model_are_refused():
    model = tiny_moe_model("qwen3_moe")
    controller = RoutingController(model)
    stats = stats_from(text=[1] * 4, vision=[1] * 4)  # made for a 1-layer, 4-expert model
    with pytest.raises(MoEGRPOError, match="made for another model"):
        stats.check_model(model, controller)


def test_masked_experts_are_never_drawn_for_their_modality():
    """Over many sampled forwards, each modality draws only its allowed experts, in the same sequences."""
    model = tiny_moe_model("qwen3_moe")
    vision_id = 5
    controller = RoutingController(model, vision_token_ids=[vision_id])
    counts = torch.randint(0, 50, (controller.num_layers, 2, controller.num_experts))
    stats = ModalityStatistics(counts=counts, model={"top_k": 2})
    masks = stats.masks(0.5)  # 4 of 8 masked per layer and modality
    controller.set_expert_masks(masks)
    input_ids = torch.randint(6, 40, (4, 12))
    input_ids[:, 2:6] = vision_id  # vision and text tokens in every sequence
    modality = controller.token_modality(input_ids).long()
    for _ in range(50):
        with torch.no_grad(), controller.rollout("sample") as recording:
            model(input_ids)
        routes = recording.steps[0].long()  # [B, S, L, K]
        for layer in range(controller.num_layers):
            allowed = masks[layer][modality]  # [B, S, N]
            assert allowed.gather(-1, routes[:, :, layer]).all()
