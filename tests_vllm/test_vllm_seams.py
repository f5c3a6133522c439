"""The TRL seams `MoEVLLMGeneration` builds on: fail loudly when one moves (as tests/test_trl_seams.py does)."""

from __future__ import annotations

import inspect

from trl.generation import vllm_generation
from trl.trainer import grpo_trainer

from trl_moe_grpo.vllm_routing.generation import MoEVLLMGeneration

# TRL 1.16's methods overridden or called, with their parameters (annotations left out).
SEAMS = {
    "_init_vllm": "self",
    "generate": "self, prompts, images, num_generations, profiler=None",
    "sync_weights": "self",
    "_iter_named_params": "self",
}


def parameters(function) -> str:
    return ", ".join(
        str(p.replace(annotation=inspect.Parameter.empty)) for p in inspect.signature(function).parameters.values()
    )


def test_overridden_and_called_methods_keep_their_signatures():
    found = {name: parameters(getattr(vllm_generation.VLLMGeneration, name)) for name in SEAMS}
    assert found == SEAMS
    overridden = {name for name in vars(MoEVLLMGeneration) if hasattr(vllm_generation.VLLMGeneration, name)}
    assert overridden - {"__init__", "__doc__", "__module__"} <= set(SEAMS)


def test_the_names_swapped_in_for_a_call_are_where_trl_looks_them_up():
    """`_init_vllm` builds `LLM(...)` by its module's global, `GRPOTrainer.__init__` builds `VLLMGeneration(...)` by
    its module's: the two names the context managers of `generation.py` replace while TRL's code runs."""
    assert "LLM(" in inspect.getsource(vllm_generation.VLLMGeneration._init_vllm)
    assert vllm_generation.LLM.__module__.startswith("vllm")
    assert "VLLMGeneration(" in inspect.getsource(grpo_trainer.GRPOTrainer.__init__)
    assert grpo_trainer.VLLMGeneration is vllm_generation.VLLMGeneration
    assert "self.llm.generate(" in inspect.getsource(vllm_generation.VLLMGeneration.generate)
