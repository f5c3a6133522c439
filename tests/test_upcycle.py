"""Upcycling dense models into MoE models: function preserved by `copy`, round trip through `from_pretrained`, the
learning signal of the default init, expert initializations, the preset's parameter counts, errors."""

from __future__ import annotations

import json
import os
import resource

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from trl_moe_grpo import MoEGRPOError, RoutingController
from trl_moe_grpo.testing import (
    VOCAB,
    build_char_tokenizer,
    build_tiny_internvl_processor,
    tiny_dense_config,
    tiny_dense_internvl,
    tiny_dense_model,
    tiny_moe_model,
)
from trl_moe_grpo.upcycle import DEFAULT_INIT, ExpertInit, parameter_report, upcycle
from trl_moe_grpo.upcycle.init import resolve_init
from trl_moe_grpo.upcycle.report import meta_model
from trl_moe_grpo.upcycle.source import load_source

FAMILIES = ["qwen3", "llama", "mistral", "internvl"]
MOE_ARCHITECTURES = {
    "qwen3": "Qwen3MoeForCausalLM",
    "llama": "MixtralForCausalLM",
    "mistral": "MixtralForCausalLM",
    "internvl": "InternVLForConditionalGeneration",
}
EXPERTS, TOP_K = 4, 2
IMAGE_TOKEN = VOCAB.index("<IMG_CONTEXT>")
# Small enough that every tiny checkpoint spans several shards, so the shard-by-shard path is what runs.
SHARD = "12KB"


# ---------------------------------------------------------------------- helpers and fixtures


def save_dense(folder: str, family: str, shard: str = SHARD):
    """Save a tiny dense model of `family` with its tokenizer (or processor) to `folder`; return the model."""
    if family == "internvl":
        model = tiny_dense_internvl()
        build_tiny_internvl_processor().save_pretrained(folder)
    else:
        model = tiny_dense_model(family)
        build_char_tokenizer().save_pretrained(folder)
    model.save_pretrained(folder, max_shard_size=shard)
    return model


def load(folder: str, family: str):
    auto = AutoModelForImageTextToText if family == "internvl" else AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def model_inputs(family: str, batch: int = 2) -> dict:
    """Token ids (with one image for InternVL, so the vision tower and projector run too)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 40, (batch, 9), generator=generator)
    if family != "internvl":
        return {"input_ids": input_ids}
    input_ids[:, 1] = IMAGE_TOKEN  # image_seq_length=1: one placeholder per image
    return {"input_ids": input_ids, "pixel_values": torch.randn(batch, 3, 28, 28, generator=generator)}


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def sampled_logits(model, controller: RoutingController, inputs: dict, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with controller.rollout("sample"):
        return logits(model, inputs)


def tensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder, by checkpoint key."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """family -> (source folder, dense model), each saved once for the module."""
    sources = {}
    for family in FAMILIES:
        folder = str(tmp_path_factory.mktemp(f"dense_{family}"))
        sources[family] = (folder, save_dense(folder, family))
    return sources


@pytest.fixture(scope="module")
def upcycled(dense, tmp_path_factory):
    """`upcycled(family, init)` -> output folder, converted once per module."""
    cache = {}

    def get(family: str, init: str = DEFAULT_INIT) -> str:
        if (family, init) not in cache:
            out = str(tmp_path_factory.mktemp(f"moe_{family}_{init}"))
            upcycle(dense[family][0], out, EXPERTS, TOP_K, init=init, max_shard_size=SHARD, progress=False)
            cache[family, init] = out
        return cache[family, init]

    return get


# ---------------------------------------------------------------------- function preserved, round trip


@pytest.mark.parametrize("family", FAMILIES)
def test_copy_init_keeps_the_dense_function_under_any_routing(dense, upcycled, family):
    """Identical experts whose top-K weights sum to 1: the MoE is the dense model, whatever the router picks."""
    dense_model = dense[family][1]
    moe = load(upcycled(family, "copy"), family)
    inputs = model_inputs(family)
    expected = logits(dense_model, inputs)
    torch.testing.assert_close(logits(moe, inputs), expected, atol=1e-5, rtol=0)
    controller = RoutingController(moe)
    for seed in range(3):
        torch.testing.assert_close(sampled_logits(moe, controller, inputs, seed), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_loads_with_auto_classes_and_generates(dense, upcycled, family, tmp_path):
    folder = upcycled(family)
    auto = AutoModelForImageTextToText if family == "internvl" else AutoModelForCausalLM
    moe, info = auto.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert type(moe).__name__ == MOE_ARCHITECTURES[family]
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    text = moe.config.get_text_config()
    assert (text.num_experts, text.num_experts_per_tok) == (EXPERTS, TOP_K)
    assert len(RoutingController(moe).layer_names) == text.num_hidden_layers

    # Written exactly as the model's own save_pretrained writes it: same keys, same tensors.
    moe.save_pretrained(tmp_path)
    ours, theirs = tensors(folder), tensors(str(tmp_path))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in ours.values())

    # Tokenizer or processor, chat template and generation config came along.
    source = dense[family][0]
    loader = AutoProcessor if family == "internvl" else AutoTokenizer
    assert loader.from_pretrained(folder).chat_template == loader.from_pretrained(source).chat_template
    assert os.path.isfile(os.path.join(folder, "generation_config.json"))

    inputs = model_inputs(family, batch=1)
    with torch.no_grad():
        generated = moe.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_internvl_checkpoints_in_either_key_layout_upcycle(dense, tmp_path):
    """InternVL checkpoints saved by transformers 4.52+ name the language model `model.language_model.*` (older ones,
    and transformers 5's save_pretrained, `language_model.model.*`): both convert, keeping their layout."""
    from safetensors.torch import save_file

    source, out = tmp_path / "new_layout", str(tmp_path / "out")
    source.mkdir()
    renames = [("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model.")]
    renames += [(f"{part}.", f"model.{part}.") for part in ("vision_tower", "multi_modal_projector")]
    renamed = {}
    for key, tensor in tensors(dense["internvl"][0]).items():
        old, new = next(((old, new) for old, new in renames if key.startswith(old)), ("", ""))
        renamed[new + key[len(old) :]] = tensor
    assert any(key.startswith("model.language_model.layers.") for key in renamed)
    save_file(renamed, str(source / "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(dense["internvl"][0]):
        if name.endswith(".json") and not name.startswith("model.safetensors"):
            (source / name).write_bytes(open(os.path.join(dense["internvl"][0], name), "rb").read())
    upcycle(str(source), out, EXPERTS, TOP_K, init="copy", progress=False)
    assert "model.language_model.layers.0.mlp.experts.3.gate_proj.weight" in tensors(out)
    inputs = model_inputs("internvl")
    torch.testing.assert_close(
        logits(load(out, "internvl"), inputs), logits(dense["internvl"][1], inputs), atol=1e-5, rtol=0
    )


def test_output_does_not_depend_on_source_sharding(dense, upcycled, tmp_path):
    """Random draws are seeded by tensor name: the same model in one file or in many converts to the same tensors."""
    single, out = str(tmp_path / "single"), str(tmp_path / "out")
    dense["qwen3"][1].save_pretrained(single)
    assert os.path.isfile(os.path.join(single, "model.safetensors"))
    result = upcycle(single, out, EXPERTS, TOP_K, progress=False)
    assert result.shards == ["model.safetensors"]
    sharded = tensors(upcycled("qwen3"))
    for key, tensor in tensors(out).items():
        torch.testing.assert_close(tensor, sharded[key], atol=0, rtol=0)


def test_streaming_shards_are_plain_safetensors(tmp_path):
    """Mixed dtypes (sorted by element size, as safetensors does), odd sizes, scalars; a failed shard is removed."""
    from trl_moe_grpo.upcycle.checkpoint import TORCH_DTYPES, StreamingShard, TensorInfo

    written = {
        "a.weight": torch.randn(3, 5),
        "b.bias": torch.randn(7).to(torch.bfloat16),
        "c.mask": torch.tensor([True, False, True]),
        "d.scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    entries = sorted(written.items(), key=lambda item: -item[1].element_size())
    path = str(tmp_path / "model.safetensors")
    names = {dtype: name for name, dtype in TORCH_DTYPES.items()}
    with StreamingShard(path, [(k, TensorInfo(names[t.dtype], tuple(t.shape))) for k, t in entries]) as shard:
        for key, tensor in entries:
            shard.write(key, tensor)
    read = tensors(str(tmp_path))
    assert read.keys() == written.keys()
    for key, tensor in written.items():
        assert torch.equal(read[key], tensor)

    broken = str(tmp_path / "broken.safetensors")
    with pytest.raises(MoEGRPOError, match="Internal error"):
        with StreamingShard(broken, [("x", TensorInfo("F32", (2,)))]) as shard:
            shard.write("x", torch.zeros(3))
    assert not os.path.exists(broken)


# ---------------------------------------------------------------------- the default init gives MoE-GRPO a signal


@pytest.mark.parametrize("family", ["qwen3", "internvl"])
def test_sampled_routings_differ_with_the_default_init_but_not_with_copy(upcycled, family):
    inputs = model_inputs(family)
    moe = load(upcycled(family), family)
    controller = RoutingController(moe)
    first, second = (sampled_logits(moe, controller, inputs, seed) for seed in (0, 1))
    assert (first - second).abs().max() > 1e-3

    copies = load(upcycled(family, "copy"), family)
    controller = RoutingController(copies)
    first, second = (sampled_logits(copies, controller, inputs, seed) for seed in (0, 1))
    torch.testing.assert_close(first, second, atol=1e-5, rtol=0)


def group_rollouts(model, prompt_ids: torch.Tensor, group_size: int = 8) -> list[tuple[int, ...]]:
    """G greedy rollouts of one prompt, each routed by its own sampled experts (MoE-GRPO's rollouts)."""
    controller = RoutingController(model)
    with controller.rollout("sample"), torch.no_grad():
        out = model.generate(
            prompt_ids.repeat(group_size, 1), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    controller.remove()
    return [tuple(row.tolist()) for row in out[:, prompt_ids.shape[1] :]]


def grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Group-relative advantages as in GRPO: reward minus the group mean, over the group std."""
    return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


def test_copy_init_gives_moe_grpo_nothing_to_learn_and_the_default_does(upcycled):
    """With identical experts all G rollouts agree, so every reward in a group is equal and every advantage is zero:
    neither the token loss nor the gate loss has a gradient. The default init's rollouts disagree."""
    tokenizer = build_char_tokenizer()
    # Enough prompts that "some disagree" does not hang on one random stream (a handful of prompts once gave none).
    prompts = ["3+9=", "what is 2+2?", "hello", "1+1=", "abc", "7-3="]
    prompts += [f"{a}*{b}+{a}=" for a in range(6) for b in (4, 8)]
    disagreeing = {}
    for init in ("copy", DEFAULT_INIT):
        model = load(upcycled("qwen3", init), "qwen3")
        torch.manual_seed(0)
        disagreeing[init] = 0
        for prompt in prompts:
            rollouts = group_rollouts(model, tokenizer(prompt, return_tensors="pt").input_ids)
            # Any accuracy reward is a function of the completion; this one rewards the first rollout's answer.
            rewards = torch.tensor([float(r == rollouts[0]) for r in rollouts])
            if init == "copy":
                assert len(set(rollouts)) == 1
                assert torch.equal(grpo_advantages(rewards), torch.zeros(len(rollouts)))
            disagreeing[init] += len(set(rollouts)) > 1 and bool(grpo_advantages(rewards).abs().max() > 0)
    assert disagreeing["copy"] == 0
    assert disagreeing[DEFAULT_INIT] >= 1


# ---------------------------------------------------------------------- expert and router initialization


@pytest.mark.parametrize("family", ["qwen3", "internvl"])
def test_expert_similarity_reads_the_upcycled_experts_distance(upcycled, family):
    """`benchmarks/expert_similarity.py`: copies are at distance 0; the default noise (0.01 of each weight's std)
    puts two experts about 0.01 * sqrt(2) apart."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from expert_similarity import expert_weights, pairwise_relative_distance

    for init, low, high in (("copy", 0.0, 0.0), (DEFAULT_INIT, 0.012, 0.016)):
        weights = expert_weights(Path(upcycled(family, init)))
        assert len(weights) == 3 * 2 and all(w.shape[0] == EXPERTS for w in weights.values())  # 3 kinds, 2 layers
        for w in weights.values():
            assert low <= pairwise_relative_distance(w) <= high, (init, pairwise_relative_distance(w))


def test_noise_init_is_relative_and_differs_per_expert():
    dense = torch.randn(64, 32) * 3.0
    init = ExpertInit("noise", noise_std=0.01)
    experts = [init.expert(dense, "gate", f"e{i}", f"n{i}") for i in range(4)]
    for expert in experts:
        relative = (expert - dense).std() / dense.std()
        assert 0.008 < relative < 0.012
    assert not torch.equal(experts[0], experts[1])
    assert torch.equal(init.expert(dense, "gate", "e0", "n0"), experts[0])  # seeded by name


def test_drop_init_reinitializes_the_same_neurons_in_all_three_projections():
    hidden, intermediate = 16, 40
    gate, up, down = (
        torch.randn(intermediate, hidden),
        torch.randn(intermediate, hidden),
        torch.randn(hidden, intermediate),
    )
    init = ExpertInit("drop", drop_ratio=0.25)
    changed = []
    for proj, weight in (("gate", gate), ("up", up), ("down", down)):
        expert = init.expert(weight, proj, f"expert.{proj}", "layer0.expert1")
        rows = (expert != weight).any(dim=0 if proj == "down" else 1)
        changed.append(rows.nonzero().flatten().tolist())
    assert changed[0] == changed[1] == changed[2]
    assert len(changed[0]) == 10  # 25% of 40 neurons; the other 30 are exact copies
    other = init.expert(gate, "gate", "expert.gate", "layer0.expert2")
    assert (other != gate).any(dim=1).nonzero().flatten().tolist() != changed[0]


def test_routers_start_small_and_random(upcycled):
    moe = load(upcycled("qwen3"), "qwen3")
    for name in RoutingController(moe).layer_names:
        weight = moe.get_submodule(name).weight
        assert 0.015 < weight.std() < 0.025  # router_std=0.02, never zero: zero routers tie every expert


@pytest.mark.parametrize("options", [dict(init="nope"), dict(init="noise", noise_std=0.0), dict(router_std=0.0)])
def test_bad_init_options_are_errors(options):
    init = options.pop("init", DEFAULT_INIT)
    with pytest.raises(MoEGRPOError):
        ExpertInit(init, **options)


def test_init_is_one_expert_init_or_the_name_of_a_kind(dense, upcycled, tmp_path):
    """`upcycle(init=...)` takes an `ExpertInit` (every setting) or a kind's name (its defaults), nothing else."""
    assert resolve_init("drop") == ExpertInit("drop")
    custom = ExpertInit("noise", noise_std=0.05, seed=3)
    assert resolve_init(custom) is custom
    with pytest.raises(MoEGRPOError, match="ExpertInit\\('noise', noise_std=0.05"):
        resolve_init(0.01)

    def tensors(folder: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return {k: v for name in os.listdir(folder) if name.endswith(".safetensors")
                for k, v in load_file(os.path.join(folder, name)).items()}  # fmt: skip

    by_name = tensors(upcycled("qwen3", "noise"))
    out = str(tmp_path / "default")
    upcycle(dense["qwen3"][0], out, EXPERTS, TOP_K, init=ExpertInit(), max_shard_size=SHARD, progress=False)
    same = tensors(out)
    assert by_name.keys() == same.keys() and all(torch.equal(by_name[k], same[k]) for k in by_name)
    out = str(tmp_path / "custom")
    upcycle(dense["qwen3"][0], out, EXPERTS, TOP_K, init=custom, max_shard_size=SHARD, progress=False)
    other = tensors(out)
    expert = next(k for k in by_name if ".experts." in k)
    assert not torch.equal(by_name[expert], other[expert])

    with pytest.raises(MoEGRPOError, match="applies to CLIP only"):
        upcycle(dense["qwen3"][0], str(tmp_path / "dmu"), EXPERTS, TOP_K, init="multiplet", progress=False)
    assert not os.path.exists(tmp_path / "dmu")


# ---------------------------------------------------------------------- parameter report


def test_preset_dry_run_reproduces_the_papers_counts():
    """InternVL3.5-1B upcycled to 8 experts, top-2: the paper's 1.3B active of 2.9B parameters."""
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = parameter_report(preset="internvl3_5-1b", num_experts=8, top_k=2)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - ru_before) / 1024
    assert abs(report.total / 2.9e9 - 1) < 0.05
    assert abs(report.active / 1.3e9 - 1) < 0.05
    assert (report.total, report.active) == (2_910_815_232, 1_325_368_320)
    # The dense preset is exactly the released checkpoint's 1,060,897,792 stored parameters.
    assert report.dense == 1_060_897_792
    assert report.component("vision tower").dense == 304_012_288
    assert report.component("projector").dense == 5_253_120
    assert report.component("MLP / experts").total == 8 * report.component("MLP / experts").dense
    # Meta device: 2.9B parameters would be 5.8 GB in bf16; nothing near that was allocated.
    assert grown_mb < 500


def test_dry_run_builds_on_the_meta_device():
    dense = load_source(preset="internvl3_5-1b")
    model = meta_model(dense.target.moe_config(dense.config, 8, 2))
    assert all(parameter.is_meta for parameter in model.parameters())


def test_upcycle_reports_what_it_wrote(upcycled, dense, tmp_path):
    out = str(tmp_path / "out")
    result = upcycle(dense["llama"][0], out, EXPERTS, TOP_K, progress=False)
    written = sum(t.numel() for t in tensors(out).values())
    assert result.report.total == written  # tied embeddings: stored once, counted once
    experts = result.report.component("MLP / experts")
    assert experts.total == EXPERTS * experts.dense and experts.active == TOP_K * experts.dense
    assert result.conversion == "llama -> mixtral" and result.copied == ["tokenizer", "generation_config"]
    assert parameter_report(dense["llama"][0], EXPERTS, TOP_K) == result.report  # the dry-run counts the same


# ---------------------------------------------------------------------- errors


def test_unsupported_source_lists_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(MoEGRPOError) as error:
        upcycle(str(tmp_path), str(tmp_path / "out"), progress=False)
    message = str(error.value)
    assert "`gpt2`" in message
    for supported in ("qwen3 -> qwen3_moe", "llama -> mixtral", "mistral -> mixtral", "internvl with a qwen3"):
        assert supported in message


def test_moe_and_custom_code_sources_get_specific_hints(tmp_path):
    tiny_moe_model("qwen3_moe").save_pretrained(tmp_path / "moe")
    with pytest.raises(MoEGRPOError, match="already a Mixture-of-Experts"):
        parameter_report(str(tmp_path / "moe"))
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(MoEGRPOError, match="-HF"):
        parameter_report(str(tmp_path / "chat"))


def test_incompatible_dense_features_are_refused(tmp_path):
    tiny_dense_model(config=tiny_dense_config("llama", mlp_bias=True)).save_pretrained(tmp_path)
    with pytest.raises(MoEGRPOError, match="mlp_bias"):
        upcycle(str(tmp_path), str(tmp_path / "out"), progress=False)


def test_pickle_weights_and_incomplete_checkpoints_are_refused(dense, tmp_path):
    (tmp_path / "pickled").mkdir()
    for name in ("config.json",):
        (tmp_path / "pickled" / name).write_text(open(os.path.join(dense["qwen3"][0], name)).read())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MoEGRPOError, match="pickle"):
        upcycle(str(tmp_path / "pickled"), str(tmp_path / "out"), progress=False)

    partial = tmp_path / "partial"
    model = tiny_dense_model("qwen3")
    state = {k: v for k, v in model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    model.save_pretrained(partial, state_dict=state)
    with pytest.raises(MoEGRPOError, match="missing: layer 1 up_proj"):
        upcycle(str(partial), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # refused before writing


def test_output_folder_is_not_overwritten_silently(dense, upcycled):
    folder = upcycled("mistral")
    with pytest.raises(MoEGRPOError, match="overwrite"):
        upcycle(dense["mistral"][0], folder, EXPERTS, TOP_K, progress=False)
    with pytest.raises(MoEGRPOError, match="source folder"):
        upcycle(dense["mistral"][0], dense["mistral"][0], progress=False)


def test_bad_sizes_are_errors(dense):
    for num_experts, top_k in ((1, 1), (4, 5), (4, 0)):
        with pytest.raises(MoEGRPOError, match="num_experts"):
            parameter_report(dense["qwen3"][0], num_experts, top_k)
    with pytest.raises(MoEGRPOError, match="max_shard_size"):
        upcycle(dense["qwen3"][0], "unused", max_shard_size="two gigs", progress=False)


def test_a_hub_name_is_fetched_without_pickle_files(dense, monkeypatch):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return dense["qwen3"][0]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert load_source("someone/dense-qwen3").folder == dense["qwen3"][0]
    ((repo_id, patterns),) = calls
    assert repo_id == "someone/dense-qwen3" and "*.safetensors" in patterns and not any("bin" in p for p in patterns)

    def offline(repo_id, allow_patterns):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MoEGRPOError, match="local folder"):
        load_source("someone/dense-qwen3")
