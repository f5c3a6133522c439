"""Every Mixture-of-Experts family of the installed transformers, discovered at test time.

Each family's default config is shrunk to a tiny model (2 layers, hidden size 64, 8 experts, top-2) and built from it;
the routing controller must accept it and replay sampled routes exactly, or refuse it with an error that names the
router and the reason. A family the test cannot build is reported as an expected failure with its build error, not
skipped. `scripts/supported_families.py` prints the README's table from the same checks.
"""

from __future__ import annotations

import functools

import pytest

from trl_moe_grpo.testing.families import (
    CONTROL_MINIMUM,
    REPLAY_TOLERANCE,
    check_family,
    moe_model_types,
)

FAMILIES = moe_model_types()
# The families the project's users run RL on today (issue 19); each must be accepted and replay where installed.
NAMED = [
    "qwen3_5_moe",
    "qwen3_next",
    "glm4_moe",
    "glm4v_moe",
    "llama4_text",
    "ernie4_5_moe",
    "ernie4_5_vl_moe",
    "kimi_linear",
    "deepseek_v2",
    "minimax",
    "jamba",
    "granitemoe",
    "phimoe",
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "gpt_oss",
    "deepseek_v3",
    "qwen3_vl_moe",
]


@functools.cache
def checked(model_type: str):
    return check_family(model_type)


def test_discovery_finds_the_known_families():
    """The walk over transformers' model types finds the families the package always supported, and many more."""
    assert {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3", "qwen3_vl_moe"} <= set(FAMILIES)
    assert len(FAMILIES) >= 40


def test_discovery_keeps_autoregressive_generators_only():
    """Families are kept for a generating class that derives from `GenerationMixin` (token-by-token decoding); a
    block-diffusion model, which denoises whole canvases, is left out (GRPO scores completions by a causal forward)."""
    import transformers
    from transformers import GenerationMixin
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from trl_moe_grpo.testing.families import generates_autoregressively, generating_class_name

    for model_type in FAMILIES:
        assert issubclass(getattr(transformers, generating_class_name(model_type)), GenerationMixin), model_type
    if "diffusion_gemma" in CONFIG_MAPPING_NAMES:
        assert generating_class_name("diffusion_gemma") and not generates_autoregressively("diffusion_gemma")
        assert "diffusion_gemma" not in FAMILIES
    assert "unlimited_ocr" not in CONFIG_MAPPING_NAMES or generates_autoregressively("unlimited_ocr")


@pytest.mark.skipif("dots3_note" not in FAMILIES, reason="Dots 3 Note not installed")
def test_routers_outside_the_language_decoder_are_refused():
    """Dots 3 Note's vision tower has MoE layers of its own, which route image patches, not decoder tokens: the
    controller refuses the model naming that router, while the text-only family (the same decoder) is accepted."""
    from trl_moe_grpo import MoEGRPOError, RoutingController
    from trl_moe_grpo.testing.families import build_tiny_family

    model = build_tiny_family("dots3_note")
    with pytest.raises(MoEGRPOError, match=r"Dots3NoteVisionTopKRouter` at `model\.vision_tower\.") as error:
        RoutingController(model)
    assert "outside the language decoder (`model.language_model`)" in str(error.value)
    assert len(RoutingController(model.model.language_model).adapters) == 2  # its own routers are fine
    assert checked("dots3_note_text").status == "replays"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family(model_type):
    """Accepted and exact (replay <= 1e-5, stock top-K replay reproduces the stock logits, the selection law sums to
    1, a sampled forward differs from the stock one, a modality mask is never violated), or refused naming the router
    and the reason."""
    check = checked(model_type)
    if check.status == "not built":
        pytest.xfail(f"{model_type}: the tiny model could not be built or run: {check.detail}")
    if check.status == "refused":
        assert "dense model first" not in check.detail, check.detail
        reasons = ("Router `transformers.models.", "no router module", "encoder-decoder")
        assert any(reason in check.detail for reason in reasons), check.detail
        assert model_type not in NAMED, f"{model_type} must be supported: {check.detail}"
        return
    assert check.status == "replays", check
    assert check.replay_error <= REPLAY_TOLERANCE
    assert check.stock_replay_error <= REPLAY_TOLERANCE
    assert check.control_gap >= CONTROL_MINIMUM
    assert check.probability_error <= 1e-5
    assert check.masked_draws == 0


def test_named_families_replay():
    """Every family named in issue 19 that this transformers has is accepted and replays exactly."""
    missing = [t for t in NAMED if t in FAMILIES and checked(t).status != "replays"]
    assert not missing, {t: checked(t).detail for t in missing}


def test_at_least_90_percent_of_built_families_replay():
    """Of the families the test builds, at least 90% replay exactly; the rest are refused with a reason."""
    built = [checked(t) for t in FAMILIES if checked(t).status != "not built"]
    replaying = [c for c in built if c.status == "replays"]
    assert len(replaying) >= 0.9 * len(built), [(c.model_type, c.status, c.detail[:120]) for c in built]


def test_at_least_90_percent_of_discovered_families_replay():
    """Of all the families discovered (built or not), at least 90% are accepted and replay exactly."""
    replaying = [t for t in FAMILIES if checked(t).status == "replays"]
    assert len(replaying) >= 0.9 * len(FAMILIES), [(t, checked(t).status) for t in FAMILIES if t not in replaying]


@pytest.mark.skipif("ernie4_5_vl_moe" not in FAMILIES, reason="ERNIE 4.5-VL not installed")
def test_per_modality_expert_groups_share_a_trace_layer():
    """ERNIE 4.5-VL sends text and vision tokens to separate expert groups, each with its own router: the two routers
    share one trace layer, each token is routed (and replayed) by its modality's group, the captures put both groups'
    rows back in token order, and Gate-GRPO's log-probabilities reach both routers."""
    import torch

    from trl_moe_grpo import RoutingController
    from trl_moe_grpo.losses import set_log_prob
    from trl_moe_grpo.testing.families import build_tiny_family

    model = build_tiny_family("ernie4_5_vl_moe")
    controller = RoutingController(model)
    assert controller.num_layers == len(controller.layer_names) == len(controller._all_adapters) // 2
    input_ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    vision = torch.zeros_like(input_ids)
    vision[:, 2:5] = 1  # tokens the vision experts take (`moe_mm_token_type_ids`, as the processor marks images)
    inputs = dict(input_ids=input_ids, moe_mm_token_type_ids=vision, mm_token_type_ids=vision)
    with torch.no_grad():
        stock = model(**inputs).logits
        with controller.rollout("sample") as recording:
            sampled = model(**inputs).logits
    routes = recording.steps[0]
    assert bool((routes >= 0).all()), "every token has a route in every layer, from one group or the other"
    with controller.step_scope():
        controller.start_replay(routes)
        replayed = model(**inputs).logits
        captures = controller.captures()
        loss = sum(
            set_log_prob(a.selection_log_probs(c.logits), c.recorded).sum()
            for a, c in zip(controller.adapters, captures)
        )
        loss.backward()
    assert (replayed - sampled).abs().max() <= 1e-5 < (sampled - stock).abs().max()
    for layer, capture in enumerate(captures):
        assert torch.equal(capture.recorded, routes[:, :, layer].reshape(-1, routes.shape[-1]).long())
    for adapter in controller._all_adapters:
        assert adapter.router.weight.grad is not None and adapter.router.weight.grad.abs().max() > 0
