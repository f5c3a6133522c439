"""Every Mixture-of-Experts family of the installed transformers, built tiny from its own config.

`moe_model_types()` walks transformers' model types at run time and keeps those whose modeling code holds experts
(or whose default config nests such a family, e.g. a vision-language wrapper) and that generate text autoregressively
(a block-diffusion model such as DiffusionGemma is left out: GRPO's per-token log-probabilities need a causal
forward). `build_tiny_family(model_type)` shrinks the family's default config (2 layers, hidden size 64, 8 experts,
top-2) and builds the generating model for it (causal LM, image-text-to-text, or seq2seq). Nothing is downloaded:
weights are random and seeded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

# Config attribute -> tiny value. Applied to the family's config and to every config nested in it.
_SIZES: dict[str, int] = {
    "hidden_size": 64,
    "hidden_sizes": 64,  # per-stage widths of a convolutional tower (an audio encoder)
    "d_model": 64,
    "n_embd": 64,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "d_ff": 64,
    "moe_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "ffn_hidden_size": 64,
    "num_attention_heads": 4,
    "num_heads": 4,
    "n_head": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "kv_channels": 16,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "n_heads": 4,
    "num_dense_layers": 0,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_decoder_layers": 2,
    "depth": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    # Multi-head latent attention.
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 16,
    # Sparse-attention indexers.
    "index_head_dim": 16,
    "index_n_heads": 4,
    # Experts.
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "num_experts_per_token": 2,
    "moe_topk": 2,
    "moe_top_k": 2,
    "moe_k": 2,
    "top_k_experts": 2,
    "n_group": 2,
    "topk_group": 1,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    # Linear-attention and state-space layers.
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_d_state": 16,
    # Every layer an MoE layer.
    "first_k_dense_replace": 0,
    "decoder_sparse_step": 1,
    "moe_layer_freq": 1,
    "expert_interval": 1,
    "moe_every_k_layers": 1,
}
_EMPTY_LISTS = ("mlp_only_layers",)
_EXACT = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_experts_per_tok",
    "moe_topk",
    "moe_top_k",
)
_MAX_PARAMETERS = 25_000_000


def _nested(config: PretrainedConfig) -> dict[str, PretrainedConfig]:
    return {k: v for k, v in vars(config).items() if isinstance(v, PretrainedConfig)}


def _read(config: Any, key: str) -> Any:
    try:
        return getattr(config, key, None)
    except Exception:  # per-layer attributes of heterogeneous configs refuse global access
        return None


def _layer_choice(kwargs: dict[str, Any], layers: int) -> list[int] | None:
    """Two layer indices whose per-layer entries cover the most distinct values, an MoE layer first."""
    lists = [v for v in kwargs.values() if isinstance(v, list) and len(v) == layers and layers > 2]
    if not lists:
        return None
    entries = [tuple(str(v[i]) for v in lists) for i in range(layers)]
    moe = [i for i, e in enumerate(entries) if any(x in ("sparse", "moe") for x in e)]
    first = moe[-1] if moe else layers - 1

    def preference(i: int) -> tuple:  # an attention layer, then the most different from the first
        attention = any(x in ("full_attention", "attention", "sliding_attention") for x in entries[i])
        return (i != first, attention, sum(a != b for a, b in zip(entries[i], entries[first])), i)

    second = max(range(layers), key=preference)
    return sorted({first, second}) if second != first else [first - 1, first]


def _fit_mrope(rope: dict[str, Any], rotary_dim: int) -> None:
    """Rescale a multimodal rope's `mrope_section` to sum to half the (smaller) rotary dimension."""
    section = rope.get("mrope_section")
    if not isinstance(section, list) or not section:
        return
    target = max(len(section), rotary_dim // 2)
    scaled = [max(1, v * target // sum(section)) for v in section]
    scaled[0] += target - sum(scaled)
    rope["mrope_section"] = scaled


def shrink_config(config: PretrainedConfig, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    """A tiny copy of `config` (and of every config nested in it), rebuilt through its class so derived fields follow.

    `overrides` are set last; a key `sub.key` reaches the nested config `sub`.
    """
    overrides = dict(overrides or {})
    kwargs = config.to_dict()
    layers = _read(config, "num_hidden_layers")
    for key, value in _nested(config).items():
        nested = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(f"{key}.")}
        kwargs[key] = shrink_config(value, nested).to_dict()
    choice = _layer_choice(kwargs, layers) if isinstance(layers, int) else None
    for key, value in list(kwargs.items()):
        if key in _EXACT and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            kwargs[key] = _SIZES[key]  # every family gets 8 experts, top-2 (HunYuan's default is a single expert)
        elif key in _SIZES and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            kwargs[key] = min(value, _SIZES[key])
        elif key in _SIZES and isinstance(value, list) and all(isinstance(v, int) for v in value):
            if choice is not None and len(value) == layers:  # per-layer sizes: the chosen layers
                value = [value[i] for i in choice]
            kwargs[key] = [min(v, _SIZES[key]) for v in value]
        elif key in _SIZES and value is None and key in ("num_experts_per_tok", "head_dim"):
            kwargs[key] = _SIZES[key]
        elif key in _EMPTY_LISTS and isinstance(value, list):
            kwargs[key] = []
        elif choice is not None and value == list(range(layers)):
            kwargs[key] = list(range(len(choice)))  # per-layer layer indices, each layer its own (KV sources)
        elif choice is not None and isinstance(value, list) and len(value) == layers:
            kwargs[key] = [value[i] for i in choice]  # per-layer lists (layer types): the chosen layers
    if "enable_moe_block" in kwargs:  # families whose MoE block is optional (Gemma 4)
        kwargs["enable_moe_block"] = True
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if kwargs.get(key) is None:
                kwargs[key] = _SIZES[key]
    for key, value in list(kwargs.items()):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if key.startswith("vocab_size"):
                kwargs[key] = min(value, _SIZES["vocab_size"])
            elif key.startswith("intermediate_size") and key not in _SIZES:
                kwargs[key] = _SIZES["intermediate_size"]
            elif key.endswith("hidden_size") and key not in _SIZES:  # e.g. a projector's text_hidden_size
                kwargs[key] = _SIZES["hidden_size"]
            elif re.fullmatch(r"adapter_(in|out|input|output)_(dim|size)", key):  # an adapter between hidden sizes
                kwargs[key] = _SIZES["hidden_size"]
            elif key == "hidden_size_per_layer_input":
                kwargs[key] = 16
    if "topk_group" in kwargs:  # group-limited routing: 2 groups of 4, the best group kept
        kwargs["n_group" if "num_expert_group" not in kwargs else "num_expert_group"] = 2
        kwargs["topk_group"] = 1
    if "n_routed_experts" in kwargs and kwargs["n_routed_experts"] is None:  # MoE switched off by default (dots1)
        kwargs["n_routed_experts"] = _SIZES["n_routed_experts"]
    if kwargs.get("kv_lora_rank"):  # multi-head latent attention: as many key/value heads as query heads
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads")
        if "head_dim" in kwargs:
            kwargs["head_dim"] = kwargs.get("qk_rope_head_dim")
    vocab = kwargs.get("vocab_size")
    if isinstance(vocab, int):
        # Special tokens of a large vocabulary must stay inside the small one, and distinct.
        spare = iter(range(vocab - 1, 0, -1))
        for key, value in list(kwargs.items()):
            if re.search(r"(token_id|token_index)$", key) and isinstance(value, int) and value >= vocab:
                kwargs[key] = next(spare)
            elif re.search(r"token_ids?$", key) and isinstance(value, list) and any(v >= vocab for v in value):
                kwargs[key] = [next(spare) if v >= vocab else v for v in value]
    rope = kwargs.get("rope_parameters")
    if isinstance(rope, dict):
        head_dim = kwargs.get("qk_rope_head_dim") or kwargs.get("head_dim") or 16
        _fit_mrope(rope, int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    kwargs.update({k: v for k, v in overrides.items() if "." not in k})
    kwargs.pop("per_layer_config", None)  # derived from the per-layer lists, which were cut
    kwargs["initializer_range"] = 0.1
    kwargs.pop("transformers_version", None)
    kwargs.pop("architectures", None)
    return type(config)(**{k: v for k, v in kwargs.items() if k != "model_type"})


# The auto classes that generate text, in the order a family's generating model is looked up.
_GENERATING_MAPPINGS = (
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
)


def _modeling_source(model_type: str) -> str:
    """The text of the family's modeling file, read from disk (importing ~100 modeling modules takes a minute)."""
    import transformers.models
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module_name = model_type_to_module_name(model_type)
    path = Path(transformers.models.__path__[0]) / module_name / f"modeling_{module_name}.py"
    return path.read_text() if path.is_file() else ""


def generating_class_name(model_type: str) -> str | None:
    """The class name of the family's text-generating model (vision-language first), or `None` if it has none."""
    from transformers.models.auto import modeling_auto

    for mapping in _GENERATING_MAPPINGS:
        name = getattr(modeling_auto, mapping).get(model_type)
        if name:
            return name
    return None


def generates_autoregressively(model_type: str) -> bool:
    """Whether the family's generating class decodes token by token: it derives from transformers' `GenerationMixin`.

    GRPO scores a completion by one causal forward over prompt and completion, with the routes its generation drew;
    a block-diffusion model (DiffusionGemma: its own `generate` denoises whole canvases of tokens over several
    bidirectional decoder passes) has neither, so it is no text generator in this sense.
    """
    name = generating_class_name(model_type)
    if not name:
        return False
    bases = re.search(rf"^class {re.escape(name)}\(([^)]*)\)", _modeling_source(model_type), re.MULTILINE)
    if bases and re.search(r"\bGenerationMixin\b", bases.group(1)):
        return True  # read from the source: most families name the mixin, and importing them all is slow
    import transformers
    from transformers import GenerationMixin

    return issubclass(getattr(transformers, name), GenerationMixin)  # e.g. a family mixin deriving from it


def moe_model_types(generating: bool = True) -> list[str]:
    """Model types of the installed transformers whose modeling code has Mixture-of-Experts experts.

    With `generating`, only those with a model class that generates text autoregressively (causal LM,
    image-text-to-text or seq2seq, deriving from `GenerationMixin`, see `generates_autoregressively`); vision towers,
    audio encoders and other sub-models of a family, and block-diffusion models, are left out.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    types = [t for t in CONFIG_MAPPING_NAMES if re.search(r"self\.experts\s*=", _modeling_source(t))]
    if generating:
        types = [t for t in types if generates_autoregressively(t)]
    return sorted(types)


# Dots 3's sliding-window layers take their attention sizes from `swa_*` constructor arguments, which no config field
# holds (they become `per_layer_config`, which the shrinking drops as derived).
_DOTS3_SLIDING = {
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 4,
    "swa_q_lora_rank": 32,
    "swa_kv_lora_rank": 16,
    "swa_head_dim": 16,
    "swa_qk_nope_head_dim": 8,
    "swa_qk_rope_head_dim": 8,
    "swa_v_head_dim": 16,
}

# What the generic shrinking cannot know: layer patterns given as periods or index lists.
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    # DBRX's attention clamps with `clip_qkv`, which defaults to None (a crash in transformers 5.25).
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    "deepseek_v4": {"mlp_layer_types": ["hash_moe", "moe"]},  # a hash-routed layer, left stock, and a routed one
    "deepseek_ocr2": {"text_config.mlp_layer_types": ["sparse", "sparse"]},
    "dots1": {"n_shared_experts": 1},
    "dots3_note_text": _DOTS3_SLIDING,
    "dots3_note": {f"text_config.{k}": v for k, v in _DOTS3_SLIDING.items()},
    "hy_v4": {"indexer_types": ["full", "full"]},
    "hy_v4_vl": {"text_config.indexer_types": ["full", "full"]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "kolibri1_1": {
        "layer_types": ["sliding_attention", "indexed_attention"],
        "index_layers": [1],
        "kv_source_layers": [0, 1],
        "index_num_heads": 2,  # at most the query heads per key head (4 // 2)
    },
    "mistral4": {"head_dim": 16},  # its head is the nope and rope parts together
    "qwen4_exp": {
        "text_config.indexer_n_heads": 2,
        "text_config.indexer_kv_heads": 1,
        "text_config.indexer_head_dim": 16,
        "text_config.indexer_budget": 16,
        "text_config.indexer_compress_ratio": 4,
    },
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 16,
        "indexer_compress_ratio": 4,
    },
    "unlimited_ocr": {"text_config.num_key_value_heads": 4},  # its eager attention does not repeat key/value heads
    "step3p7": {"text_config.sliding_window": 16},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "nemotron_h": {"layers_block_type": ["full_attention", "moe"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0, "expert_layer_period": 1, "expert_layer_offset": 0},
    "llama4": {"text_config.moe_layers": [0, 1], "text_config.no_rope_layers": [1, 0]},
    # Multimodal rotary sections default (in the modeling code) to ones for a 128-wide head.
    "ernie4_5_vl_moe": {
        "text_config.rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]}
    },
    "glm4v_moe": {
        "text_config.rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
        }
    },
    "zaya": {"num_experts_per_tok": 1},  # ZAYA supports top-1 only
    "llama4_text": {"moe_layers": [0, 1], "no_rope_layers": [1, 0]},
}


def tiny_family_config(model_type: str, vocab_size: int | None = None) -> PretrainedConfig:
    """The family's default config, shrunk (see `shrink_config`); `vocab_size` sets every nested config's vocabulary
    (e.g. to a test tokenizer's size, so every generated id decodes to text)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if vocab_size is not None:
        _SIZES["vocab_size"], previous = vocab_size, _SIZES["vocab_size"]
    try:
        return shrink_config(CONFIG_MAPPING[model_type](), FAMILY_OVERRIDES.get(model_type))
    finally:
        if vocab_size is not None:
            _SIZES["vocab_size"] = previous


def build_tiny_family(model_type: str, seed: int = 0, vocab_size: int | None = None) -> PreTrainedModel:
    """A seeded, randomly initialized tiny model of the family's generating class, fp32, eager attention, eval mode."""
    import transformers

    config = tiny_family_config(model_type, vocab_size)
    model_class = getattr(transformers, generating_class_name(model_type))
    with torch.device("meta"):
        size = sum(p.numel() for p in model_class._from_config(config).parameters())
    if size > _MAX_PARAMETERS:
        raise ValueError(f"the shrunk config still has {size / 1e6:.0f}M parameters (a size field it does not shrink)")
    torch.manual_seed(seed)
    model = model_class._from_config(config, dtype=torch.float32, attn_implementation="eager")
    for module in model.modules():
        # Bias corrections start at zero; give them values so the stock rule visibly uses them.
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor) and bias.dtype.is_floating_point:
            with torch.no_grad():
                bias.normal_(0.0, 0.05)
    return model.eval()


@dataclass
class FamilyCheck:
    """What `check_family` found for one model type.

    Attributes:
        model_type: transformers' model type.
        model_class: the generating class built.
        status: `replays` (accepted, every check passed), `refused` (the controller refused it with an error),
            `failed` (accepted, but a check failed) or `not built` (the tiny model could not be built or run).
        rule: the router rules found (`SoftmaxTopKAdapter: softmax, renormalized`, ...), empty if refused.
        replay_error: max |logits difference| of a sampled-route forward and its replay (fp32).
        control_gap: max |logits difference| between the sampled-route forward and the stock top-K forward.
        stock_replay_error: max |logits difference| between the stock model and a replay of its own top-K.
        probability_error: max |1 - sum of the selection distribution| over tokens and layers.
        masked_draws: sampled routes that picked an expert a modality mask forbids (must be 0).
        detail: the error message when refused, failed or not built.
    """

    model_type: str
    model_class: str
    status: str
    rule: str = ""
    replay_error: float = float("nan")
    control_gap: float = float("nan")
    stock_replay_error: float = float("nan")
    probability_error: float = float("nan")
    masked_draws: int = -1
    detail: str = ""


REPLAY_TOLERANCE = 1e-5
CONTROL_MINIMUM = 1e-3


def _forward(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def check_family(model_type: str, seed: int = 0) -> FamilyCheck:
    """Build the family tiny and check the routing controller on it (see [`FamilyCheck`])."""
    from ..errors import MoEGRPOError
    from ..routing.controller import RoutingController

    name = generating_class_name(model_type) or ""
    try:
        model = build_tiny_family(model_type, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(3, min(100, model.config.get_text_config().vocab_size), (2, 9), generator=generator)
        if model.config.is_encoder_decoder:
            with torch.no_grad():
                stock = model(input_ids=input_ids, decoder_input_ids=input_ids).logits.float()
        else:
            stock = _forward(model, input_ids)
    except Exception as error:  # the family itself does not build or run at this size
        return FamilyCheck(model_type, name, "not built", detail=f"{type(error).__name__}: {error}"[:300])
    try:
        controller = RoutingController(model)
    except MoEGRPOError as error:
        return FamilyCheck(model_type, name, "refused", detail=str(error))
    rules = sorted(
        {f"{type(a).__name__}: {a.describe() if hasattr(a, 'describe') else a.rule}" for a in controller.adapters}
    )
    check = FamilyCheck(model_type, name, "replays", rule="; ".join(rules))
    try:
        torch.manual_seed(seed)
        with controller.capture(selection_probs=True) as recording:
            captured = _forward(model, input_ids)
        check.probability_error = max(float((p.sum(-1) - 1).abs().max()) for p in recording.selection_probs)
        with controller.step_scope():
            controller.start_replay(recording.steps[0])
            replayed_stock = _forward(model, input_ids)
            controller.finish_replay()
        check.stock_replay_error = max(
            float((replayed_stock - stock).abs().max()), float((captured - stock).abs().max())
        )
        with controller.rollout("sample") as sampled:
            sampled_logits = _forward(model, input_ids)
        with controller.step_scope():
            controller.start_replay(sampled.steps[0])
            replayed = _forward(model, input_ids)
            controller.finish_replay()
        check.replay_error = float((replayed - sampled_logits).abs().max())
        check.control_gap = float((sampled_logits - stock).abs().max())
        # Modality guidance: text tokens may only draw from the first half of the experts (never fewer than top_k).
        allowed = max(controller.top_k, controller.num_experts // 2)
        masks = torch.ones(controller.num_layers, 2, controller.num_experts, dtype=torch.bool)
        masks[:, 0, allowed:] = False
        controller.set_expert_masks(masks)
        with controller.rollout("sample") as masked:
            _forward(model, input_ids)
        controller.set_expert_masks(None)
        check.masked_draws = int((masked.steps[0] >= allowed).sum())
    except Exception as error:
        check.status, check.detail = "failed", f"{type(error).__name__}: {error}"[:300]
        return check
    finally:
        controller.remove()
    if not (
        check.replay_error <= REPLAY_TOLERANCE
        and check.stock_replay_error <= REPLAY_TOLERANCE
        and check.control_gap >= CONTROL_MINIMUM
        and check.probability_error <= 1e-5
        and check.masked_draws == 0
    ):
        check.status = "failed"
    return check
