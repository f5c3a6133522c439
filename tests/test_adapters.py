"""Router adapters: bit-exact parity with the stock router of every supported family, clear errors for the rest."""

from __future__ import annotations

import importlib

import pytest
import torch

from trl_moe_grpo import MoEGRPOError, RoutingController
from trl_moe_grpo.routing import ROUTER_ADAPTERS, find_routers
from trl_moe_grpo.routing.adapters import SoftmaxTopKAdapter
from trl_moe_grpo.testing import tiny_dense_model, tiny_moe_model

# Family -> (router class, transformers module defining it).
FAMILY_ROUTERS = {
    "qwen3_moe": ("Qwen3MoeTopKRouter", "qwen3_moe"),
    "qwen2_moe": ("Qwen2MoeTopKRouter", "qwen2_moe"),
    "mixtral": ("MixtralTopKRouter", "mixtral"),
    "olmoe": ("OlmoeTopKRouter", "olmoe"),
    "gpt_oss": ("GptOssTopKRouter", "gpt_oss"),
    "deepseek_v3": ("DeepseekV3TopkRouter", "deepseek_v3"),
}
FAMILIES = list(FAMILY_ROUTERS)
SOFTMAX_FAMILIES = [family for family in FAMILIES if family != "deepseek_v3"]
# Registered router classes with no tiny family of their own, and where transformers defines them.
OTHER_ROUTERS = {"Qwen3VLMoeTextTopKRouter": "qwen3_vl_moe"}
# Router classes this package defines (with the router contract of transformers'), and their modules.
PACKAGE_ROUTERS = {"CLIPMoeTopKRouter": "trl_moe_grpo.clip_moe.modeling"}


def random_ids(batch: int = 3, length: int = 9, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, 40, (batch, length), generator=generator)


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def router_outputs(router, rows: int = 64, seed: int = 0):
    """Call a router module directly on random hidden states: `(logits, weights, indices)`."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, router.weight.shape[1], generator=generator) * 4.0
    with torch.no_grad():
        return router(hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_routers_are_registered(family):
    """Every MoE layer of each tiny family is found, in order, with the router class registered for that family."""
    model = tiny_moe_model(family, seed=0)
    routers = find_routers(model)
    expected_class, _ = FAMILY_ROUTERS[family]
    assert len(routers) == model.config.num_hidden_layers == 2
    assert [type(module).__name__ for _, module, _ in routers] == [expected_class] * 2
    assert [name.split(".")[2] for name, _, _ in routers] == ["0", "1"]
    for _, module, adapter in routers:
        assert isinstance(adapter, ROUTER_ADAPTERS[expected_class])
        assert adapter.router is module
        assert (adapter.num_experts, adapter.top_k) == (8, 2)


def test_every_registered_router_class_exists_in_transformers():
    """Each key of `ROUTER_ADAPTERS` names a router class that transformers really defines."""
    where = {name: module for name, module in FAMILY_ROUTERS.values()} | OTHER_ROUTERS
    assert set(ROUTER_ADAPTERS) == set(where) | set(PACKAGE_ROUTERS), "add the defining module of new router classes"
    where = {name: f"transformers.models.{module}.modeling_{module}" for name, module in where.items()}
    for class_name, module_name in (where | PACKAGE_ROUTERS).items():
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name, None)
        assert isinstance(cls, type) and issubclass(cls, torch.nn.Module), class_name


@pytest.mark.parametrize("family", FAMILIES)
def test_idle_controller_is_bit_identical_to_stock(family):
    """In `topk` mode (idle, and inside an idle `step_scope`) and after `remove()` the logits are the stock ones."""
    model = tiny_moe_model(family, seed=0)
    input_ids = random_ids()
    stock = logits_of(model, input_ids)

    controller = RoutingController(model)
    assert controller.mode == "topk"
    assert torch.equal(logits_of(model, input_ids), stock)
    with controller.step_scope():
        assert torch.equal(logits_of(model, input_ids), stock)
    assert torch.equal(logits_of(model, input_ids), stock)

    controller.remove()
    assert torch.equal(logits_of(model, input_ids), stock)
    for _, module, _ in find_routers(model):
        assert not module._forward_hooks, "remove() left a hook on a router"
    assert not model._forward_pre_hooks, "remove() left the model pre-hook"


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_a_topk_trace_is_bit_identical_to_stock(family):
    """Recording under `rollout("topk")`, then replaying that trace, gives the stock logits bit for bit."""
    model = tiny_moe_model(family, seed=0)
    input_ids = random_ids()
    stock = logits_of(model, input_ids)
    controller = RoutingController(model)

    with controller.rollout("topk") as recording:
        recorded_logits = logits_of(model, input_ids)
    assert torch.equal(recorded_logits, stock)
    (trace,) = recording.steps
    assert trace.shape == (*input_ids.shape, 2, 2) and trace.dtype == torch.int16

    with controller.step_scope():
        controller.start_replay(trace)
        replayed = logits_of(model, input_ids)
        controller.finish_replay()
        captures = controller.captures()
    assert torch.equal(replayed, stock)
    for layer, capture in enumerate(captures):
        assert torch.equal(capture.top_k, trace[:, :, layer].reshape(-1, 2).long())
        assert torch.equal(capture.dispatched, capture.top_k)
        assert bool(capture.valid.all())


@pytest.mark.parametrize("family", FAMILIES)
def test_mixing_weights_equal_the_router_weights(family):
    """`mixing_weights` of the router's own top-K reproduces the router's returned weights exactly, dtype included."""
    model = tiny_moe_model(family, seed=0)
    for layer, (_, router, adapter) in enumerate(find_routers(model)):
        logits, weights, indices = router_outputs(router, seed=layer)
        mixed = adapter.mixing_weights(logits, indices, like=weights)
        assert mixed.dtype == weights.dtype
        assert torch.equal(mixed, weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixing_weights_follow_the_order_of_the_set(family):
    """The weight of an expert does not depend on its slot: reversing the set reverses the weights."""
    model = tiny_moe_model(family, seed=0)
    for _, router, adapter in find_routers(model):
        logits, weights, indices = router_outputs(router)
        flipped = adapter.mixing_weights(logits, indices.flip(-1), like=weights)
        torch.testing.assert_close(flipped, weights.flip(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_selection_log_probs_are_normalized(family):
    """`selection_log_probs` is a float32 log-distribution over all experts (each row's logsumexp is 0)."""
    model = tiny_moe_model(family, seed=0)
    for _, router, adapter in find_routers(model):
        logits, _, _ = router_outputs(router)
        log_probs = adapter.selection_log_probs(logits)
        assert log_probs.shape == logits.shape and log_probs.dtype == torch.float32
        assert bool(torch.isfinite(log_probs).all())
        torch.testing.assert_close(torch.logsumexp(log_probs, dim=-1), torch.zeros(len(logits)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_softmax_selection_is_log_softmax_and_ranks_like_the_router(family):
    """For softmax families the selection distribution is `softmax(z)`, whose top-K is the router's own set."""
    model = tiny_moe_model(family, seed=0)
    for _, router, adapter in find_routers(model):
        logits, _, indices = router_outputs(router)
        log_probs = adapter.selection_log_probs(logits)
        torch.testing.assert_close(log_probs, torch.log_softmax(logits.float(), dim=-1), rtol=0, atol=1e-6)
        top = log_probs.topk(adapter.top_k, dim=-1).indices
        assert torch.equal(top.sort(-1).values, indices.sort(-1).values)


def test_deepseek_selection_is_normalized_sigmoid():
    """For DeepSeek-V3 the selection distribution is `sigmoid(z) / sum sigmoid(z)`, without bias or group limit."""
    model = tiny_moe_model("deepseek_v3", seed=0)
    for _, router, adapter in find_routers(model):
        assert bool((router.e_score_correction_bias != 0).any()), "the tiny model should exercise the bias"
        logits, _, _ = router_outputs(router)
        scores = logits.float().sigmoid()
        expected = torch.log(scores / scores.sum(dim=-1, keepdim=True))
        torch.testing.assert_close(adapter.selection_log_probs(logits), expected, rtol=0, atol=1e-6)


def test_unknown_router_class_with_a_known_contract_is_recognized():
    """A router class no registry lists, whose output and scoring rule are a known family's, works unchanged."""
    model = tiny_moe_model("qwen3_moe", seed=0)
    name, router, _ = find_routers(model)[1]
    router.__class__ = type("MyCustomTopKRouter", (type(router),), {})
    routers = dict((n, a) for n, _, a in find_routers(model))
    adapter = routers[name]
    assert isinstance(adapter, SoftmaxTopKAdapter) and adapter.renormalize is True and adapter.scale == 1.0
    logits, weights, indices = router_outputs(router)
    torch.testing.assert_close(adapter.mixing_weights(logits, indices, like=weights), weights, rtol=0, atol=1e-7)


def test_router_with_an_unknown_rule_is_an_error_naming_it():
    """A router whose weights follow no known rule raises `MoEGRPOError` naming the layer, class and module."""
    model = tiny_moe_model("qwen3_moe", seed=0)
    name, router, _ = find_routers(model)[1]

    def forward(self, hidden_states):
        logits, weights, indices = type(self).__mro__[1].forward(self, hidden_states)
        return logits, weights.square(), indices  # not a function any known rule gives

    router.__class__ = type("MyCustomTopKRouter", (type(router),), {"forward": forward})
    with pytest.raises(MoEGRPOError) as error:
        RoutingController(model)
    message = str(error.value)
    assert "MyCustomTopKRouter" in message and name in message and __name__ in message
    assert "scoring rules" in message and "dense" not in message


def test_dense_model_is_an_error():
    """A dense model (no router at all) raises `MoEGRPOError` saying it has no Mixture-of-Experts router."""
    model = tiny_dense_model("qwen3")
    with pytest.raises(MoEGRPOError, match="no Mixture-of-Experts router") as error:
        RoutingController(model)
    assert "Qwen3ForCausalLM" in str(error.value)
    assert "Qwen3MoeTopKRouter" in str(error.value)
