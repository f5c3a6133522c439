"""`benchmarks/route_sensitivity.py`: the share of prompts whose sampled-routing rollouts disagree in reward."""

import importlib.util
from pathlib import Path

import pytest
import torch

from trl_moe_grpo.demo.visual_mc import accuracy_reward, visual_mc_rows

REPO = Path(__file__).resolve().parents[1]
REASON = REPO / "bundled" / "tiny-internvl-moe-reason"


@pytest.fixture(scope="module")
def route_sensitivity():
    spec = importlib.util.spec_from_file_location("route_sensitivity", REPO / "benchmarks" / "route_sensitivity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.route_sensitivity


def load():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(REASON, dtype=torch.float32), AutoProcessor.from_pretrained(
        REASON
    )


def test_routing_changes_the_reward_of_reasoning_rollouts(route_sensitivity):
    model, processor = load()
    rows = visual_mc_rows(8, seed=10_000, tasks=("tally",))
    result = route_sensitivity(model, processor, rows, accuracy_reward, num_rollouts=4, max_new_tokens=64)
    # The build measured 0.78 on 18 tally prompts (G=8): the working's routing changes the answer.
    assert 0 < result["route_sensitivity"] <= result["completions_not_all_equal"] <= 1
    assert 0 < result["rollout_reward"] < 1


def test_identical_experts_make_every_group_agree(route_sensitivity):
    """With every expert a copy of expert 0 (and mixing weights that sum to 1), the routing cannot change a rollout:
    no group may disagree. A measurement that mixed up rollouts of different prompts would."""
    model, processor = load()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for weight in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                weight.copy_(weight[:1].expand_as(weight))
    assert model.config.text_config.norm_topk_prob
    rows = visual_mc_rows(8, seed=10_000, tasks=("tally", "colour"))
    result = route_sensitivity(model, processor, rows, accuracy_reward, num_rollouts=4, max_new_tokens=64)
    assert result["route_sensitivity"] == 0 == result["completions_not_all_equal"]
    assert result["route_sensitivity/tally"] == 0 == result["route_sensitivity/colour"]
    assert 0 < result["rollout_reward"]  # the copies still answer: the groups agree, they are not all empty
