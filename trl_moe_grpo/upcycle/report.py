"""Parameter report of an upcycling: total and active parameters per component, from configs alone.

Both the dense source and the MoE target are built on the meta device: parameters have shapes but no storage, so a
report of a multi-billion-parameter model takes no memory and no time. Tied parameters count once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

EXPERTS, DENSE_MLP = "experts", "dense MLP"
# The table shows a model's MLPs in one row, dense in the source and experts in the MoE.
MLP_ROW = "MLP / experts"
# Components in table order: (name, test on the parameter's name). The first match wins.
COMPONENTS: list[tuple[str, re.Pattern]] = [
    ("vision tower", re.compile(r"vision_tower\.")),
    ("projector", re.compile(r"multi_modal_projector\.")),
    ("embeddings", re.compile(r"embed_tokens\.")),
    ("attention", re.compile(r"\.self_attn\.")),
    (EXPERTS, re.compile(r"\.experts\.")),
    ("routers", re.compile(r"\.(mlp|block_sparse_moe)\.gate\.weight$")),
    (DENSE_MLP, re.compile(r"\.mlp\.")),
    ("norms", re.compile(r"norm")),
    ("lm head", re.compile(r"(^|\.)lm_head\.")),
]
OTHER = "other"


@dataclass(frozen=True)
class ComponentCount:
    """Parameters of one component: in the dense model, in the MoE, and those one token uses in the MoE."""

    name: str
    dense: int
    total: int
    active: int


@dataclass(frozen=True)
class ParameterReport:
    """Parameter counts of a dense model and of its upcycled MoE, per component.

    Attributes:
        architecture: the MoE's architecture (e.g. `InternVLForConditionalGeneration`).
        num_experts, top_k: N and K of the MoE layers.
        components: one row per component that has parameters, in table order.
    """

    architecture: str
    num_experts: int
    top_k: int
    components: list[ComponentCount]

    @property
    def dense(self) -> int:
        return sum(c.dense for c in self.components)

    @property
    def total(self) -> int:
        return sum(c.total for c in self.components)

    @property
    def active(self) -> int:
        return sum(c.active for c in self.components)

    def component(self, name: str) -> ComponentCount:
        return next(c for c in self.components if c.name == name)

    def format_table(self) -> str:
        """A Markdown table: component, dense, MoE total, MoE active (with exact totals underneath)."""
        header = f"| component | dense | MoE total | MoE active (top-{self.top_k} of {self.num_experts}) |"
        lines = [header, "| --- | ---: | ---: | ---: |"]
        for c in self.components:
            lines.append(f"| {c.name} | {human(c.dense)} | {human(c.total)} | {human(c.active)} |")
        lines.append(f"| **total** | **{human(self.dense)}** | **{human(self.total)}** | **{human(self.active)}** |")
        lines.append("")
        lines.append(
            f"{self.architecture}: {self.total:,} parameters, {self.active:,} active per token "
            f"(dense source: {self.dense:,})."
        )
        return "\n".join(lines)


def human(count: int) -> str:
    """`1_325_368_320` -> `1.325B`; `0` -> `-`."""
    if count == 0:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3f}{suffix}" if suffix == "B" else f"{count / scale:.2f}{suffix}"
    return str(count)


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The model of `config` on the meta device: shapes only, no memory, no initialization cost."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def count_by_component(model: torch.nn.Module) -> dict[str, int]:
    """Unique parameters of `model` per component name (tied weights once)."""
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():  # named_parameters() skips tied duplicates
        component = next((c for c, pattern in COMPONENTS if pattern.search(name)), OTHER)
        counts[component] = counts.get(component, 0) + parameter.numel()
    return counts


def compare(dense_config: PretrainedConfig, moe_config: PretrainedConfig) -> ParameterReport:
    """Report of the dense model of `dense_config` upcycled into the MoE of `moe_config` (built on the meta device)."""
    text = moe_config.get_text_config()
    num_experts, top_k = int(text.num_experts), int(text.num_experts_per_tok)
    dense = count_by_component(meta_model(dense_config))
    moe = count_by_component(meta_model(moe_config))
    rows = []
    for name in [name for name, _ in COMPONENTS if name != DENSE_MLP] + [OTHER]:
        if name == EXPERTS:
            # Each token runs top_k of the num_experts experts of every MoE layer, and all of any MLP left dense.
            experts, left_dense = moe.get(EXPERTS, 0), moe.get(DENSE_MLP, 0)
            source = dense.get(DENSE_MLP, 0) + dense.get(EXPERTS, 0)
            row = ComponentCount(MLP_ROW, source, experts + left_dense, experts * top_k // num_experts + left_dense)
        elif name in dense or name in moe:
            row = ComponentCount(name, dense.get(name, 0), moe.get(name, 0), moe.get(name, 0))
        else:
            continue
        rows.append(row)
    architecture = (moe_config.architectures or [type(moe_config).__name__])[0]
    return ParameterReport(architecture=architecture, num_experts=num_experts, top_k=top_k, components=rows)


def parameter_report(
    source: str | None = None, num_experts: int = 8, top_k: int = 2, *, preset: str | None = None
) -> ParameterReport:
    """Total and active parameters per component of `source` (or `preset`) upcycled to `num_experts`, top-`top_k`.

    Nothing is loaded but configs: both models are built on the meta device.

    Example: `parameter_report(preset="internvl3_5-1b", num_experts=8, top_k=2)` gives the paper's model, 1.3B active
    of 2.9B parameters.
    """
    from .source import load_source

    dense = load_source(source, preset)
    return compare(dense.config, dense.target.moe_config(dense.config, num_experts, top_k))
