"""Route sensitivity (`analysis/route_sensitivity.py`, `trl-moe-grpo probe-routing`, the benchmark script): the share
of prompts whose sampled-routing rollouts disagree in reward, measured where the answer is known and on the bundled
models."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from trl_moe_grpo import RoutingController
from trl_moe_grpo.analysis.route_sensitivity import (
    RouteSensitivity,
    format_route_sensitivity,
    measure_route_sensitivity,
)
from trl_moe_grpo.cli import main
from trl_moe_grpo.demo.visual_mc import accuracy_reward, visual_mc_rows
from trl_moe_grpo.testing import build_char_tokenizer
from trl_moe_grpo.testing.planted import REWARDED_EXPERTS, planted_moe_model, planted_reward

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "bundled" / "tiny-internvl-moe"
REASON = REPO / "bundled" / "tiny-internvl-moe-reason"


def rewarded_set_probability(model) -> float:
    """Probability that sampling 2 of 8 experts without replacement draws a rewarded one (the planted prompt)."""
    logits = model.model.layers[0].mlp.gate.weight[:, 0].detach().double() * math.sqrt(model.config.hidden_size)
    p = torch.softmax(logits, -1).tolist()
    missed = sum(
        p[i] * p[j] / (1 - p[i]) for i, j in itertools.permutations(range(8), 2) if {i, j}.isdisjoint(REWARDED_EXPERTS)
    )
    return 1 - missed


def test_planted_task_route_sensitivity_matches_its_law():
    """Planted task: a rollout is right exactly when it samples a rewarded expert (probability q), so the mean reward
    is q and the share of groups of G with spread is 1 - q^G - (1 - q)^G; top-K routing never disagrees."""
    model = planted_moe_model()
    controller = RoutingController(model)
    rows = [{"prompt": "?", "answer": "B"}] * 48
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    sampled = measure_route_sensitivity(
        model, controller, tokenizer, rows, [planted_reward], 16, "sample", True, max_completion_length=1
    )
    q = rewarded_set_probability(model)
    assert 0.15 < q < 0.3
    assert sampled.rewards.shape == (48, 16) and sampled.mean_completion_length() == 1.0
    assert abs(sampled.mean_reward() - q) < 0.06  # 768 rollouts: 5 standard errors
    for group in (4, 8, 16):
        expected = 1 - q**group - (1 - q) ** group
        assert abs(sampled.share_with_spread(group) - expected) < 0.25, group
    assert sampled.share_with_spread(16) > sampled.share_with_spread(4)

    top_k = measure_route_sensitivity(
        model, controller, tokenizer, rows[:8], [planted_reward], 8, "topk", True, max_completion_length=1
    )
    assert top_k.share_with_spread() == 0.0 and top_k.mean_reward() == 0.0
    table = format_route_sensitivity([("sampled", sampled, 8), ("top-K", top_k, 8)])
    assert "0.0%" in table.splitlines()[-1]


def test_rewards_are_summed_over_functions_as_trl_sums_them():
    """Two reward functions add up; a `None` adds nothing (TRL's nansum); spread is any difference within a group."""
    from trl_moe_grpo.analysis.route_sensitivity import score_completions

    rows = [{"prompt": "?", "answer": "B"}] * 3

    def length(completions, **kwargs):
        return [None if c == "" else float(len(c)) for c in completions]

    assert score_completions([planted_reward, length], rows, ["B", "AB", ""], [[5], [4, 5], []]) == [2.0, 2.0, 0.0]
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 2.0], [0.0, 3.0]], dtype=torch.float64)
    texts = [["a", "a"], ["a", "b"], ["c", "d"], ["e", "f"]]
    result = RouteSensitivity("sample", True, rewards, torch.ones(4, 2, dtype=torch.long), texts)
    assert result.share_with_spread() == 0.5 and result.share_with_spread(1) == 0.0
    assert result.mean_reward() == pytest.approx(1.25)
    assert result.share_with_distinct_completions() == 0.75 and result.share_with_distinct_completions(1) == 0.0


def test_probe_routing_on_the_bundled_model(visual_mc_folder, capsys):
    argv = ["probe-routing", str(BUNDLED), "--dataset", str(visual_mc_folder)]
    argv += ["--reward", "trl_moe_grpo.demo.visual_mc.accuracy_reward", "--num-prompts", "4"]
    argv += ["--num-generations", "2", "--max-completion-length", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for label in (
        "sampled routing, greedy tokens (MoE-GRPO)",
        "with a larger G",
        "sampled routing, sampled tokens",
        "top-K",
    ):
        (line,) = [line for line in lines if label in line]
        share = float(line.split()[-3].rstrip("%"))
        assert 0.0 <= share <= 100.0
    assert "4 prompts" in out


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
