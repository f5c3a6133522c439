"""Which dense architectures upcycle into which stock MoE architectures: the config and checkpoint-key mapping.

Every target is a stock transformers architecture, so the output loads with plain `AutoModel*.from_pretrained` and no
custom code (and so do inference servers):

| dense source | MoE output |
| --- | --- |
| `qwen3` (`Qwen3ForCausalLM`) | `qwen3_moe` (`Qwen3MoeForCausalLM`) |
| `llama`, `mistral` | `mixtral` (`MixtralForCausalLM`) |
| `internvl` with a `qwen3` language model | `internvl` with a `qwen3_moe` one (vision tower, projector unchanged) |

Checkpoint keys are written the way each MoE model's own `save_pretrained` writes them (one tensor per expert, e.g.
`model.layers.0.mlp.experts.3.gate_proj.weight`, or Mixtral's `block_sparse_moe.experts.3.w1.weight`); transformers'
conversion mapping fuses them into its 3-D expert parameters on load, and inference servers read this layout too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from transformers import AutoConfig, PretrainedConfig

from ..errors import MoEGRPOError

# The three projections of a gated dense MLP, by their role.
PROJECTIONS = ("gate", "up", "down")

# A dense MLP weight in a checkpoint: `<prefix>layers.<l>.mlp.<gate|up|down>_proj.<weight|bias>`. Only language
# models name their MLPs this way here (InternViT's are `encoder.layer.<l>.mlp.fc1/fc2`).
DENSE_MLP_KEY = re.compile(r"^(?P<prefix>.*)layers\.(?P<layer>\d+)\.mlp\.(?P<proj>gate|up|down)_proj\.(?P<kind>\w+)$")

# Keys every config serializes that must not be passed on to a config of another model type.
_GENERIC_KEYS = ("model_type", "transformers_version", "_name_or_path", "architectures")


@dataclass(frozen=True)
class TextTarget:
    """How one dense decoder family becomes one stock MoE family.

    Attributes:
        dense_type: `model_type` of the dense source (`qwen3`).
        moe_type: `model_type` of the MoE output (`qwen3_moe`).
        architecture: the MoE causal-LM class name written to `architectures`.
        block: attribute of the MoE block in a checkpoint (`mlp`, Mixtral's `block_sparse_moe`).
        expert_names: checkpoint name of each projection inside an expert.
        num_experts_field, expert_size_field: the MoE config's names for N and for an expert's intermediate size.
        moe_fields: extra config values of the MoE family (besides N, K and the expert size).
        dense_only: config keys of the dense family the MoE family does not have (dropped once checked).
    """

    dense_type: str
    moe_type: str
    architecture: str
    block: str
    expert_names: dict[str, str]
    num_experts_field: str
    expert_size_field: str
    moe_fields: dict = field(default_factory=dict)
    dense_only: tuple[str, ...] = ()

    def check(self, dense: PretrainedConfig) -> None:
        """Raise if `dense` has a feature the MoE family cannot represent (the output would compute something else)."""
        problems = []
        if getattr(dense, "mlp_bias", False):
            problems.append("`mlp_bias=True` (the MoE experts have no biases)")
        if self.moe_type == "mixtral" and getattr(dense, "attention_bias", False):
            problems.append("`attention_bias=True` (Mixtral's attention has no biases)")
        # Qwen3 slides the window only from `max_window_layers` on, Qwen3-MoE on every layer; Mistral and Mixtral
        # both slide on every layer, unless per-layer `layer_types` mix the two kinds.
        if getattr(dense, "use_sliding_window", False) or any(
            kind != "full_attention" for kind in (getattr(dense, "layer_types", None) or [])
        ):
            problems.append("per-layer sliding-window attention")
        if problems:
            raise MoEGRPOError(
                f"Cannot upcycle this `{self.dense_type}` model into `{self.moe_type}` without changing what it "
                f"computes: it has {', '.join(problems)}. Only the stock {self.dense_type} layout is supported."
            )

    def moe_config(self, dense: PretrainedConfig, num_experts: int, top_k: int) -> PretrainedConfig:
        """The MoE config: the dense config's values, with every MLP turned into `num_experts` experts of its size."""
        self.check(dense)
        values = {k: v for k, v in dense.to_dict().items() if k not in _GENERIC_KEYS + self.dense_only}
        values.update(self.moe_fields)
        values[self.num_experts_field] = num_experts
        values["num_experts_per_tok"] = top_k
        # The experts start from the dense MLP, so each has its intermediate size.
        values[self.expert_size_field] = dense.intermediate_size
        values["architectures"] = [self.architecture]
        return AutoConfig.for_model(self.moe_type, **values)

    def expert_key(self, prefix: str, layer: int, expert: int, proj: str) -> str:
        return f"{prefix}layers.{layer}.{self.block}.experts.{expert}.{self.expert_names[proj]}.weight"

    def router_key(self, prefix: str, layer: int) -> str:
        return f"{prefix}layers.{layer}.{self.block}.gate.weight"


QWEN3 = TextTarget(
    dense_type="qwen3",
    moe_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    block="mlp",
    expert_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    num_experts_field="num_experts",
    expert_size_field="moe_intermediate_size",
    # Every layer sparse, and the top-K weights renormalized to sum to 1: with identical experts the MoE block then
    # computes exactly the dense MLP (without renormalization it would be scaled by the top-K probability mass).
    moe_fields={"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    dense_only=("layer_types", "max_window_layers"),
)
# Mixtral always renormalizes its top-K weights, so the same argument holds without a flag.
_MIXTRAL_EXPERTS = {"gate": "w1", "up": "w3", "down": "w2"}
LLAMA = TextTarget(
    dense_type="llama",
    moe_type="mixtral",
    architecture="MixtralForCausalLM",
    block="block_sparse_moe",
    expert_names=_MIXTRAL_EXPERTS,
    num_experts_field="num_local_experts",
    expert_size_field="intermediate_size",
    moe_fields={"sliding_window": None},
    dense_only=("pretraining_tp", "mlp_bias", "attention_bias"),
)
MISTRAL = TextTarget(
    dense_type="mistral",
    moe_type="mixtral",
    architecture="MixtralForCausalLM",
    block="block_sparse_moe",
    expert_names=_MIXTRAL_EXPERTS,
    num_experts_field="num_local_experts",
    expert_size_field="intermediate_size",
    dense_only=("layer_types",),
)
TEXT_TARGETS: dict[str, TextTarget] = {t.dense_type: t for t in (QWEN3, LLAMA, MISTRAL)}

# Vision-language wrappers: `model_type` -> (architecture, the language-model types they can upcycle).
VISION_LANGUAGE_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "internvl": ("InternVLForConditionalGeneration", ("qwen3",)),
}


@dataclass(frozen=True)
class Target:
    """The resolved conversion of one source: its text target, and the wrapper model type for a vision-language model.

    Attributes:
        text: how the (language) model's MLPs become experts.
        wrapper: `internvl` for a vision-language source, `None` for a causal LM.
    """

    text: TextTarget
    wrapper: str | None = None

    @property
    def architecture(self) -> str:
        return VISION_LANGUAGE_TARGETS[self.wrapper][0] if self.wrapper else self.text.architecture

    @property
    def is_vision_language(self) -> bool:
        return self.wrapper is not None

    def describe(self) -> str:
        if self.wrapper:
            return f"{self.wrapper}({self.text.dense_type}) -> {self.wrapper}({self.text.moe_type})"
        return f"{self.text.dense_type} -> {self.text.moe_type}"

    def moe_config(self, dense: PretrainedConfig, num_experts: int, top_k: int) -> PretrainedConfig:
        """The output model's config for `dense`, the source's config."""
        if num_experts < 2 or not 1 <= top_k <= num_experts:
            raise MoEGRPOError(
                f"num_experts={num_experts}, top_k={top_k}: an MoE needs at least 2 experts and 1 <= top_k <= "
                "num_experts (the paper uses 8 and 2)."
            )
        if not self.wrapper:
            return self.text.moe_config(dense, num_experts, top_k)
        values = {k: v for k, v in dense.to_dict().items() if k not in _GENERIC_KEYS}
        values["text_config"] = self.text.moe_config(dense.get_text_config(), num_experts, top_k).to_dict()
        values["architectures"] = [self.architecture]
        return AutoConfig.for_model(self.wrapper, **values)

    def check_prefix(self, key: str, prefix: str) -> None:
        """Raise unless a dense MLP weight at `key` belongs to the language model."""
        if self.wrapper and "language_model" not in prefix:
            raise MoEGRPOError(
                f"Checkpoint key `{key}` looks like a dense MLP outside the language model of this {self.wrapper} "
                "checkpoint; only the language model is upcycled. Is the checkpoint in transformers' own format?"
            )


def supported_sources() -> str:
    """One line per supported conversion, for error messages and `--help`."""
    lines = [f"  {t.dense_type} -> {t.moe_type} ({t.architecture})" for t in TEXT_TARGETS.values()]
    for wrapper, (architecture, text_types) in VISION_LANGUAGE_TARGETS.items():
        for text_type in text_types:
            moe_type = TEXT_TARGETS[text_type].moe_type
            source = f"{wrapper} with a {text_type} language model"
            lines.append(f"  {source} -> {wrapper} with a {moe_type} one ({architecture})")
    return "\n".join(lines)


def resolve_target(config: dict) -> Target:
    """The conversion for a source whose `config.json` holds `config` (a raw dict, before any custom code runs).

    Raises:
        MoEGRPOError: the source is already an MoE, or not one of the supported dense architectures.
    """
    model_type = config.get("model_type")
    text_type = None
    if model_type in VISION_LANGUAGE_TARGETS:
        text_type = (config.get("text_config") or {}).get("model_type", "qwen2")  # InternVLConfig's default
        if text_type in VISION_LANGUAGE_TARGETS[model_type][1]:
            return Target(TEXT_TARGETS[text_type], wrapper=model_type)
    elif model_type in TEXT_TARGETS:
        return Target(TEXT_TARGETS[model_type])
    described = f"`{model_type}`" + (f" with a `{text_type}` language model" if text_type else "")
    moe_keys = ("num_experts_per_tok", "num_experts", "num_local_experts", "n_routed_experts")
    already_moe = any(key in (config.get("text_config") or config) for key in moe_keys)
    hint = " It is already a Mixture-of-Experts model." if already_moe else ""
    if model_type and model_type.endswith("_chat"):
        hint = " It needs custom code: use the transformers-native release (for InternVL3.5, the `-HF` checkpoints)."
    raise MoEGRPOError(f"Cannot upcycle a {described} model.{hint} Supported sources:\n{supported_sources()}")
