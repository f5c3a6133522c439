"""CLIP-MoE: router contract parity with the adapters, replay fidelity on the vision encoder, upcycling, save/load."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModel
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from trl_moe_grpo import MoEGRPOError, RoutingController
from trl_moe_grpo.cli import main
from trl_moe_grpo.clip_moe import CLIPMoeModel, CLIPMoeTopKRouter, upcycle_clip_model, vision_encoder
from trl_moe_grpo.routing import find_routers
from trl_moe_grpo.routing.adapters import SoftmaxTopKAdapter
from trl_moe_grpo.testing.clip import tiny_clip, tiny_clip_moe
from trl_moe_grpo.upcycle import ExpertInit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dense():
    return tiny_clip(seed=0, num_hidden_layers=2)


@pytest.fixture(scope="module")
def moe():
    return tiny_clip_moe(seed=0, num_experts=4, top_k=2, init=ExpertInit("noise", noise_std=0.5))


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def embeds(model, pixels) -> torch.Tensor:
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixels).pooler_output


def test_router_follows_the_transformers_router_contract(moe):
    """Same attributes as `Qwen3MoeTopKRouter`, and bit-identical `(logits, weights, indices)` for the same weight."""
    model = moe[0]
    routers = find_routers(vision_encoder(model))
    assert [type(module).__name__ for _, module, _ in routers] == ["CLIPMoeTopKRouter"] * 2
    for _, router, adapter in routers:
        assert isinstance(adapter, SoftmaxTopKAdapter)
        assert (router.top_k, router.num_experts, tuple(router.weight.shape)) == (2, 4, (4, 64))
        stock = Qwen3MoeTopKRouter(model.config.vision_config)
        stock.weight.data.copy_(router.weight.data)
        hidden = torch.randn(50, 64, generator=torch.Generator().manual_seed(1)) * 4
        with torch.no_grad():
            for ours, theirs in zip(router(hidden), stock(hidden), strict=True):
                assert torch.equal(ours, theirs)


def test_adapter_reproduces_the_router_exactly(moe):
    """The adapter's top-K of the selection distribution and its mixing weights are the router's own outputs."""
    for _, router, adapter in find_routers(vision_encoder(moe[0])):
        hidden = torch.randn(64, 64, generator=torch.Generator().manual_seed(2)) * 4
        with torch.no_grad():
            logits, weights, indices = router(hidden)
        assert torch.equal(adapter.selection_log_probs(logits).topk(2).indices, indices)
        torch.testing.assert_close(adapter.mixing_weights(logits, indices, like=weights), weights, rtol=0, atol=1e-7)


def test_idle_controller_is_bit_identical_to_stock(moe):
    model = moe[0]
    pixels = images(3)
    stock = embeds(model, pixels)
    controller = RoutingController(vision_encoder(model))
    try:
        assert torch.equal(embeds(model, pixels), stock)
        with controller.capture() as recording:
            assert torch.equal(embeds(model, pixels), stock)
        assert recording.steps[0].shape == (3, 17, 2, 2)  # 16 patches and the class token, 2 layers, top-2
    finally:
        controller.remove()
    assert torch.equal(embeds(model, pixels), stock)


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_replay_reproduces_sampled_rollouts(moe, batch, seed):
    """A replayed forward reproduces sampled routing's image embeddings and router logits within 1e-5 in fp32; the
    stock top-K routing does not (so the test can tell replay from no replay)."""
    model = moe[0]
    controller = RoutingController(vision_encoder(model))
    try:
        pixels = images(batch, seed)
        torch.manual_seed(seed)
        with torch.no_grad(), controller.rollout("sample") as recording:
            sampled = embeds(model, pixels)
        (trace,) = recording.steps
        assert trace.dtype == torch.int16 and trace.shape == (batch, 17, 2, 2)
        with controller.capture(selection_probs=True) as top_k_recording:
            top_k = embeds(model, pixels)
        with torch.enable_grad(), controller.step_scope():
            controller.start_replay(trace)
            replayed = model.get_image_features(pixel_values=pixels).pooler_output
            captures = controller.captures()
            controller.finish_replay()
        torch.testing.assert_close(replayed.detach(), sampled, rtol=0, atol=1e-5)
        for layer, capture in enumerate(captures):
            assert torch.equal(capture.recorded, trace[:, :, layer].reshape(-1, 2).long())
            assert capture.logits.requires_grad and bool(capture.valid.all())
        if not torch.equal(trace, top_k_recording.steps[0]):
            assert (top_k - sampled).abs().max() > 1e-4
    finally:
        controller.remove()


def test_sampled_routing_differs_from_top_k(moe):
    model = moe[0]
    controller = RoutingController(vision_encoder(model))
    try:
        with torch.no_grad(), controller.rollout("sample") as recording:
            embeds(model, images(8))
        with controller.capture() as top_k:
            embeds(model, images(8))
        assert not torch.equal(recording.steps[0], top_k.steps[0])
    finally:
        controller.remove()


def test_copy_upcycling_preserves_image_embeddings(dense):
    model = dense[0]
    pixels = images(4)
    moe = upcycle_clip_model(model, num_experts=4, top_k=2, init="copy").eval()
    torch.testing.assert_close(embeds(moe, pixels), embeds(model, pixels), rtol=0, atol=1e-5)
    text = torch.tensor([[1, 5, 6, 3]])
    with torch.no_grad():
        assert torch.equal(
            moe.get_text_features(input_ids=text).pooler_output, model.get_text_features(input_ids=text).pooler_output
        )
    for init in ("noise", "drop"):
        other = upcycle_clip_model(model, num_experts=4, top_k=2, init=ExpertInit(init, noise_std=0.3)).eval()
        assert (embeds(other, pixels) - embeds(model, pixels)).abs().max() > 1e-3, init


def test_drop_upcycling_redraws_the_same_neurons_in_both_matrices_and_the_bias(dense):
    model = copy.deepcopy(dense[0])
    source = model.vision_model.encoder.layers[0].mlp
    with torch.no_grad():  # CLIP initializes biases to 0; give them a spread so redrawn ones differ
        source.fc1.bias.normal_(generator=torch.Generator().manual_seed(0))
    moe = upcycle_clip_model(model, num_experts=4, top_k=2, init=ExpertInit("drop", drop_ratio=0.25))
    experts = moe.vision_model.encoder.layers[0].mlp.experts
    for e in range(4):
        rows = (experts.fc1[e] != source.fc1.weight).any(-1)
        columns = (experts.fc2[e] != source.fc2.weight).any(0)
        biases = experts.fc1_bias[e] != source.fc1.bias
        assert int(rows.sum()) == 32  # a quarter of the 128 neurons
        assert torch.equal(rows, columns) and torch.equal(rows, biases)
        assert torch.equal(experts.fc2_bias[e], source.fc2.bias)


def test_upcycling_refuses_what_it_cannot_convert(dense, moe):
    with pytest.raises(MoEGRPOError, match="dense `transformers.CLIPModel`"):
        upcycle_clip_model(moe[0])
    with pytest.raises(MoEGRPOError, match="at least 2 experts"):
        upcycle_clip_model(dense[0], num_experts=1, top_k=1)
    with pytest.raises(MoEGRPOError, match="trains on image-caption pairs.*upcycle_clip"):
        upcycle_clip_model(dense[0], init="multiplet")
    with pytest.raises(MoEGRPOError, match="`init` is an `ExpertInit` or the name of a kind"):
        upcycle_clip_model(dense[0], init=None)
    with pytest.raises(MoEGRPOError, match="no CLIP-MoE vision encoder"):
        vision_encoder(dense[0])


def test_save_and_load_through_the_auto_classes(moe, tmp_path):
    model = moe[0]
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is CLIPMoeModel
    assert isinstance(loaded.vision_model.encoder.layers[0].mlp.gate, CLIPMoeTopKRouter)
    pixels = images(2)
    assert torch.equal(embeds(loaded.eval(), pixels), embeds(model, pixels))


def test_upcycle_command_converts_a_clip(dense, tmp_path, capsys):
    model, tokenizer, image_processor = dense
    source, output = tmp_path / "clip", tmp_path / "clip-moe"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    image_processor.save_pretrained(source)
    argv = ["upcycle", str(source), "--output", str(output), "--num-experts", "4", "--top-k", "2", "--init", "copy"]
    assert main(argv) == 0
    assert "clip -> clip_moe" in capsys.readouterr().out
    loaded = AutoModel.from_pretrained(output).eval()
    assert loaded.config.vision_config.num_experts == 4
    torch.testing.assert_close(embeds(loaded, images(2)), embeds(model, images(2)), rtol=0, atol=1e-5)
    assert {"tokenizer.json", "preprocessor_config.json"} <= set(os.listdir(output))
    assert main(["upcycle", str(source), "--num-experts", "4", "--dry-run"]) == 0
    assert "clip -> clip_moe (4 experts, top-2): parameters dense" in capsys.readouterr().out
    # An existing model is not overwritten without --overwrite: a one-line error, exit code 2.
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_upcycling_seed_changes_the_experts_and_routers(dense):
    """Each seed of the miniature upcycles its own CLIP-MoE (the expert noise and routers follow `seed`)."""
    model = dense[0]
    first, again, other = (
        upcycle_clip_model(model, 4, 2, ExpertInit("noise", noise_std=0.3, seed=s)) for s in (0, 0, 1)
    )
    experts = [m.vision_model.encoder.layers[0].mlp for m in (first, again, other)]
    assert torch.equal(experts[0].experts.fc1, experts[1].experts.fc1)
    assert not torch.equal(experts[0].experts.fc1, experts[2].experts.fc1)
    assert not torch.equal(experts[0].gate.weight, experts[2].gate.weight)
