"""Routing analysis: the measures by hand, their bounds, padding, and `trl-moe-grpo measure-routing` end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_moe_grpo import MoEGRPOError, RoutingController
from trl_moe_grpo.analysis.routing import (
    RoutingAnalysis,
    analyze_routing,
    collect_routing,
    entropy,
    expert_distributions_by_task,
    format_routing_table,
    jensen_shannon,
    mean_gate_entropy,
    mean_pairwise_jsd,
    plot_expert_utilization_by_task,
    plot_routing_probabilities,
    plot_token_activations,
    pooled_routing_entropy,
    selection_counts,
    sequence_routing_entropy,
)
from trl_moe_grpo.cli import main
from trl_moe_grpo.data_utils import calibration_batches
from trl_moe_grpo.demo.visual_mc import TASKS, visual_mc_dataset
from trl_moe_grpo.testing import build_tiny_internvl_processor, tiny_dense_internvl, tiny_moe_internvl

LN2 = math.log(2)


def routes_of(*tokens: list[list[int]]) -> torch.Tensor:
    """`[1, tokens, layers, top_k]` routes from each token's per-layer expert lists."""
    return torch.tensor([list(tokens)])


# ---------------------------------------------------------------------------------------------------- by hand


def test_uniform_selection_has_entropy_ln_n_and_a_single_expert_zero():
    # N=4, K=2: two tokens cover all four experts once (ln 4); layer 1 always picks the same two (ln 2).
    routes = routes_of([[0, 1], [2, 3]], [[2, 3], [2, 3]])  # [1, 2 tokens, 2 layers, 2]
    torch.testing.assert_close(
        sequence_routing_entropy(routes, 4), torch.tensor([[math.log(4), LN2]], dtype=torch.float64)
    )
    single = torch.full((1, 5, 3, 1), 2)  # K=1, every token of every layer chooses expert 2
    assert sequence_routing_entropy(single, 8).abs().max() == 0
    torch.testing.assert_close(entropy(torch.ones(8)), torch.tensor(math.log(8), dtype=torch.float64))
    assert entropy(torch.tensor([0.0, 3.0, 0.0])) == 0
    assert selection_counts(routes, 4).tolist() == [[[1, 1, 1, 1], [0, 0, 2, 2]]]


def test_pooled_entropy_counts_all_tokens_of_all_sequences_at_once():
    # Each sequence uses one expert (entropy 0), two sequences use different ones: pooled ln 2.
    routes = torch.tensor([[[[0]], [[0]]], [[[1]], [[1]]]])  # [2 seqs, 2 tokens, 1 layer, K=1]
    assert sequence_routing_entropy(routes, 2).abs().max() == 0
    torch.testing.assert_close(pooled_routing_entropy(routes, 2), torch.tensor([LN2], dtype=torch.float64))


def test_jensen_shannon_by_hand():
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    # m = (.75, .25): KL(p||m) = ln(4/3), KL(q||m) = ln(4/3) / 2, JSD = 3/4 ln(4/3).
    torch.testing.assert_close(jensen_shannon(p, q), torch.tensor(0.75 * math.log(4 / 3), dtype=torch.float64))
    assert jensen_shannon(p, p) == 0
    torch.testing.assert_close(jensen_shannon(p, q), jensen_shannon(q, p))
    disjoint = jensen_shannon(torch.tensor([0.2, 0.8, 0, 0]), torch.tensor([0, 0, 3.0, 1.0]))  # counts are normalized
    torch.testing.assert_close(disjoint, torch.tensor(LN2, dtype=torch.float64))
    with pytest.raises(MoEGRPOError, match="empty distribution"):
        jensen_shannon(torch.zeros(3), torch.ones(3))


def test_task_distributions_and_mean_pairwise_jsd_by_hand():
    counts = torch.tensor([[[2, 0]], [[0, 4]], [[1, 0]], [[3, 0]]])  # 4 sequences, 1 layer, 2 experts
    names, distributions = expert_distributions_by_task(counts, ["a", "b", "c", "a"])
    assert names == ["a", "b", "c"]
    assert distributions[:, 0].tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    # pairs: a|b ln 2, a|c 0, b|c ln 2
    torch.testing.assert_close(mean_pairwise_jsd(distributions), torch.tensor([2 * LN2 / 3], dtype=torch.float64))
    assert mean_pairwise_jsd(distributions[:1]) is None  # one task: not applicable
    with pytest.raises(MoEGRPOError, match="not in task_names"):
        expert_distributions_by_task(counts, ["a", "b", "c", "a"], task_names=["a", "b"])


distributions = st.integers(2, 12).flatmap(
    lambda n: st.tuples(
        *(st.lists(st.floats(0, 1e3, allow_subnormal=False), min_size=n, max_size=n) for _ in range(2))
    ).filter(lambda pq: sum(pq[0]) > 0 and sum(pq[1]) > 0)
)


@settings(max_examples=200, deadline=None)
@given(distributions)
def test_jensen_shannon_is_bounded_symmetric_and_zero_on_itself(pq):
    p, q = torch.tensor(pq[0], dtype=torch.float64), torch.tensor(pq[1], dtype=torch.float64)
    value = jensen_shannon(p, q)
    assert 0 <= value <= LN2
    assert torch.isclose(value, jensen_shannon(q, p), atol=1e-12)
    assert jensen_shannon(p, p) <= 1e-12


@settings(max_examples=200, deadline=None)
@given(distributions)
def test_entropy_is_between_zero_and_ln_n(pq):
    p = torch.tensor(pq[0], dtype=torch.float64)
    assert 0 <= entropy(p) <= math.log(len(p)) + 1e-12


def test_sequence_routing_entropy_is_not_mean_gate_entropy():
    """Confident gates that disagree across tokens, and unsure gates whose top-K agrees: the two measures part."""
    num_experts = 4
    # Every token is sure (one-hot gate, entropy 0) but the tokens cover all four experts: ln 4 over the sequence.
    sure = torch.eye(num_experts)[None, :, None, :]  # [1, 4 tokens, 1 layer, 4]
    sure_routes = sure.argmax(-1, keepdim=True)  # K=1
    assert mean_gate_entropy(sure).item() == 0
    torch.testing.assert_close(
        sequence_routing_entropy(sure_routes, num_experts), torch.tensor([[math.log(4)]]).double()
    )
    # Every token is almost undecided (entropy near ln 4) but all pick expert 0: 0 over the sequence.
    unsure = torch.tensor([0.26, 0.25, 0.25, 0.24]).expand(1, 4, 1, 4)
    unsure_routes = unsure.argmax(-1, keepdim=True)
    assert mean_gate_entropy(unsure).item() > 0.99 * math.log(4)
    assert sequence_routing_entropy(unsure_routes, num_experts).item() == 0


def test_padding_is_excluded_however_it_is_placed():
    """The same two sequences padded on the right, on the left, or with -1 routes: the same numbers."""
    torch.manual_seed(0)
    layers, top_k, experts = 3, 2, 6
    lengths = [5, 3]
    routes = [
        torch.stack([torch.randperm(experts)[:top_k] for _ in range(n * layers)]).view(n, layers, top_k)
        for n in lengths
    ]
    probs = [torch.softmax(torch.randn(n, layers, experts), -1) for n in lengths]

    def padded(side: str, width: int = 7):
        batch_routes = torch.randint(0, experts, (2, width, layers, top_k))  # garbage where padding is
        batch_probs = torch.softmax(torch.randn(2, width, layers, experts) * 5, -1)
        mask = torch.zeros(2, width, dtype=torch.long)
        for i, n in enumerate(lengths):
            span = slice(0, n) if side == "right" else slice(width - n, width)
            batch_routes[i, span], batch_probs[i, span], mask[i, span] = routes[i], probs[i], 1
        return batch_routes, batch_probs, mask

    results = []
    for side in ("right", "left"):
        batch_routes, batch_probs, mask = padded(side)
        results.append(
            (
                sequence_routing_entropy(batch_routes, experts, mask),
                pooled_routing_entropy(batch_routes, experts, mask),
                mean_gate_entropy(batch_probs, mask),
            )
        )
    batch_routes, batch_probs, mask = padded("right")
    batch_routes[mask == 0] = -1  # a trace's "no route" counts as padding too
    results.append((sequence_routing_entropy(batch_routes, experts), pooled_routing_entropy(batch_routes, experts)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)
    unpadded = torch.stack([sequence_routing_entropy(r[None], experts)[0] for r in routes])
    torch.testing.assert_close(results[0][0], unpadded)


# ---------------------------------------------------------------------------------------------------- on a model


@pytest.fixture(scope="module")
def processor():
    return build_tiny_internvl_processor()


@pytest.fixture(scope="module")
def rows():
    data = visual_mc_dataset(num_train=8, num_test=4, seed=0)["train"]
    return [data[i] for i in range(len(data))]


def test_routes_are_stock_top_k_and_padding_does_not_change_the_numbers(processor, rows):
    model = tiny_moe_internvl(seed=0)
    controller = RoutingController(model, vision_token_ids=[processor.image_token_id])
    one_by_one = analyze_routing(model, controller, processor, rows, batch_size=1)
    batched = analyze_routing(model, controller, processor, rows, batch_size=8)
    assert torch.equal(one_by_one.counts, batched.counts)
    assert one_by_one.num_tokens == batched.num_tokens
    torch.testing.assert_close(one_by_one.gate_entropy, batched.gate_entropy)
    torch.testing.assert_close(one_by_one.sequence_entropy, batched.sequence_entropy)

    # Per layer, the entropy of each token's softmax over the router logits, averaged over the unpadded tokens:
    # measured here from the routers' own outputs, without the controller.
    logits = []
    handles = [a.router.register_forward_hook(lambda m, i, o: logits.append(o[0])) for a in controller.adapters]
    inputs = next(iter(calibration_batches(processor, rows, 8)))
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    valid = inputs["attention_mask"].reshape(-1).bool()
    expected = [-(z.softmax(-1) * z.log_softmax(-1)).sum(-1)[valid].mean() for z in logits]
    torch.testing.assert_close(batched.gate_entropy.float(), torch.stack(expected), atol=1e-5, rtol=0)

    # The batch of 8 is padded, and the model routes its padding somewhere: leaving it out is what keeps them equal.
    assert (inputs["attention_mask"] == 0).any()
    with torch.no_grad(), controller.rollout("topk") as recording:
        model(**inputs)
    batch = next(collect_routing(model, controller, processor, rows, 8))
    assert torch.equal(batch.routes, recording.steps[0].long())  # the analysis sees stock top-K routing
    assert not torch.equal(selection_counts(batch.routes, 8).sum(0), batched.counts.sum(0))
    torch.testing.assert_close(batch.gate_probs.sum(-1), torch.ones(batch.gate_probs.shape[:-1]))

    assert batched.task_names == list(TASKS)
    assert batched.task_jsd is not None and (batched.task_jsd > 0).all()
    assert batched.example is not None and len(batched.example.tokens) == len(batched.example.input_ids)


def test_rows_without_a_task_column_are_one_task_and_jsd_does_not_apply(processor, rows, tmp_path):
    model = tiny_moe_internvl(seed=0)
    controller = RoutingController(model, vision_token_ids=[processor.image_token_id])
    untasked = [{k: v for k, v in row.items() if k != "task"} for row in rows[:4]]
    analysis = analyze_routing(model, controller, processor, untasked, batch_size=4)
    assert analysis.task_names == ["all"] and analysis.task_column is None
    assert analysis.task_jsd is None and analysis.summary()["task_jsd"] is None
    assert json.loads(json.dumps(analysis.to_json()))["layers"][0]["task_jsd"] is None
    assert "n/a" in format_routing_table([analysis])
    # The figures take a single analysis too.
    for plot, name in [
        (plot_expert_utilization_by_task, "utilization.png"),
        (plot_token_activations, "tokens.png"),
        (plot_routing_probabilities, "probabilities.png"),
    ]:
        assert plot(analysis, tmp_path / name).stat().st_size > 0
    assert plot_routing_probabilities(analysis, tmp_path / "last.png", token=-1).exists()
    assert isinstance(analysis, RoutingAnalysis)


def test_plotting_stays_optional():
    """Without matplotlib (the `plots` extra) the package imports and trains; drawing names the extra to install."""
    code = """
import sys
sys.modules["matplotlib"] = None  # as if not installed: importing it raises ImportError
import trl_moe_grpo, trl_moe_grpo.analysis.routing, trl_moe_grpo.trainer.callbacks
import trl_moe_grpo.commands.measure_routing
from trl_moe_grpo.analysis.plots import has_matplotlib, pyplot
from trl_moe_grpo import MoEGRPOError
try:
    pyplot()
except MoEGRPOError as error:
    print("refused:", error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "refused: Drawing figures needs matplotlib" in result.stdout
    assert "trl-moe-grpo[plots]" in result.stdout


# ---------------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two tiny InternVL-MoE models ("before", "after"), a dense one, and a visual_mc dataset, saved to disk."""
    root = tmp_path_factory.mktemp("analyze_routing")
    processor = build_tiny_internvl_processor()
    for name, model in [
        ("before", tiny_moe_internvl(seed=0)),
        ("after", tiny_moe_internvl(seed=1)),
        ("dense", tiny_dense_internvl(seed=0)),
    ]:
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    visual_mc_dataset(num_train=8, num_test=4, seed=0).save_to_disk(str(root / "data"))
    return root


def test_command_compares_two_models_and_writes_json_and_figures(saved, capsys):
    output = saved / "report"
    argv = ["measure-routing", str(saved / "before"), str(saved / "after"), "--dataset", str(saved / "data")]
    argv += ["--num-samples", "8", "--batch-size", "4", "--output-dir", str(output)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "before" in line)
    assert header.split() == ["before", "after"]
    for row in ("sequence routing entropy, layer 1", "mean gate entropy", "task-wise JSD", "pooled routing entropy"):
        assert row in printed

    data = json.loads((output / "routing_analysis.json").read_text())
    assert data["format"] == "trl-moe-grpo/routing-analysis" and data["num_samples"] == 8
    before, after = data["models"]
    assert (before["name"], after["name"]) == ("before", "after")
    assert before["model"]["num_experts"] == 8 and before["model"]["path"] == str(saved / "before")
    assert set(before["tasks"]) == set(TASKS)
    summary = before["summary"]
    assert 0 < summary["sequence_routing_entropy"] <= math.log(8) and 0 < summary["task_jsd"] <= LN2
    assert summary["sequence_routing_entropy"] != summary["mean_gate_entropy"]
    pairs = len(TASKS) * (len(TASKS) - 1) // 2
    assert len(before["pairwise_task_jsd"]) == pairs and len(before["layers"]) == 2
    assert before["summary"] != after["summary"]  # different weights, different routing
    for name in ("expert_utilization_by_task.png", "token_activations.png", "routing_probabilities.png"):
        assert (output / name).read_bytes()[:4] == b"\x89PNG"


def error_line(err: str) -> str:
    """The command's one error line (weight-loading progress bars may come before it on stderr)."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and err.endswith(lines[0] + "\n")
    assert lines[0].startswith("trl-moe-grpo measure-routing: error: ")
    return lines[0]


def test_errors_are_one_line_and_exit_code_2(saved, tmp_path, capsys):
    dataset = ["--dataset", str(saved / "data"), "--num-samples", "2"]
    assert main(["measure-routing", str(saved / "dense"), *dataset]) == 2
    assert "no Mixture-of-Experts router" in error_line(capsys.readouterr().err)

    assert main(["measure-routing", str(saved / "before"), "--dataset", str(tmp_path / "missing.json")]) == 2
    assert "Cannot load split 'train' of dataset" in error_line(capsys.readouterr().err)

    (tmp_path / "empty").mkdir()
    assert main(["measure-routing", str(tmp_path / "empty"), *dataset]) == 2
    assert "Cannot load model" in error_line(capsys.readouterr().err)


def test_text_and_vision_measures_split_the_counts(processor, rows):
    """Per modality: the text and vision counts add up to the total, each modality's sequence entropy is the entropy of
    its own tokens' selections, JSD comes in nats and bits, and the table and JSON name them."""
    from trl_moe_grpo.analysis.measures import NATS_PER_BIT, modality_token_mask

    model = tiny_moe_internvl(seed=0)
    controller = RoutingController(model, vision_token_ids=[processor.image_token_id])
    analysis = analyze_routing(model, controller, processor, rows, batch_size=4)
    text, vision = analysis.modality_counts["text"], analysis.modality_counts["vision"]
    assert torch.equal(text + vision, analysis.counts) and analysis.has_vision_tokens
    assert int(vision.sum()) > 0 and int(text.sum()) > 0

    batch = next(collect_routing(model, controller, processor, rows[:1], 1))
    vision_tokens = modality_token_mask(controller.token_modality(batch.input_ids), "vision", batch.attention_mask)
    by_hand = entropy(selection_counts(batch.routes[0][vision_tokens[0]][None], 8)[0])  # [layers]
    torch.testing.assert_close(entropy(vision[0]), by_hand)

    summary = analysis.summary()
    for modality in ("text", "vision"):
        assert 0 < summary[f"sequence_routing_entropy/{modality}"] <= math.log(8)
        assert summary[f"task_jsd_bits/{modality}"] == pytest.approx(summary[f"task_jsd/{modality}"] / NATS_PER_BIT)
    assert summary["sequence_routing_entropy/vision"] != summary["sequence_routing_entropy/text"]
    assert (
        summary["task_jsd_bits"] == pytest.approx(summary["task_jsd"] / math.log(2)) and summary["task_jsd_bits"] <= 1
    )
    table = format_routing_table([analysis])
    assert "vision tokens: task-wise JSD (bits)" in table and "the same in bits" in table
    assert "routing of the prompt tokens" in table
    data = json.loads(json.dumps(analysis.to_json()))
    assert data["tokens"] == "prompt" and data["num_tokens_by_modality"]["vision"] > 0
    assert sum(data["num_tokens_by_modality"].values()) == analysis.num_tokens


def test_eval_collector_splits_by_modality_like_the_analysis(processor, rows):
    """The trainer's evaluation collector gives the same per-modality measures as `analyze_routing` on the same
    routes: one definition for both."""
    from trl_moe_grpo.trainer.eval_routing import EvalRoutingCollector

    model = tiny_moe_internvl(seed=0)
    controller = RoutingController(model, vision_token_ids=[processor.image_token_id])
    analysis = analyze_routing(model, controller, processor, rows, batch_size=4)
    collector = EvalRoutingCollector(controller.num_layers, controller.num_experts, "task")
    for batch in collect_routing(model, controller, processor, rows, 4):
        collector.add_rows([{"task": task} for task in batch.tasks])
        log_probs = batch.gate_probs.clamp(min=1e-30).log().permute(2, 0, 1, 3).reshape(2, -1, 8)
        collector.add_routing(
            batch.routes, batch.attention_mask, log_probs, controller.token_modality(batch.input_ids)
        )
    evaluated = collector.analysis("eval", analysis.model)
    assert evaluated.tokens == "prompt and completion"
    for key, value in analysis.summary().items():
        assert evaluated.summary()[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_routed_set_measures():
    """Set comparison ignores order, inactive slots and -1; widths may differ (Expert Choice); utilization bounds."""
    from trl_moe_grpo.analysis.measures import differs_from_top_k, expert_utilization, gate_entropy, in_bits

    top_k = torch.tensor([[0, 1], [2, 3], [4, 5]])
    routed = torch.tensor([[1, 0, 7], [2, 3, 6], [4, 6, 0]])
    active = torch.tensor([[True, True, False], [True, True, True], [True, True, False]])
    assert differs_from_top_k(routed, top_k, 8, active).tolist() == [False, True, True]
    assert differs_from_top_k(torch.tensor([[1, 0], [-1, -1]]), torch.tensor([[0, 1], [0, 1]]), 8).tolist() == [
        False,
        True,
    ]
    assert expert_utilization(torch.ones(8)).item() == pytest.approx(1.0)
    assert expert_utilization(torch.tensor([5.0, 0, 0, 0])).item() == pytest.approx(0.25)
    p = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert gate_entropy(p.log()).item() == pytest.approx(entropy(p).item())
    assert in_bits(math.log(2)) == pytest.approx(1.0) and in_bits(None) is None
