"""The seams this project builds on in TRL (and transformers' Trainer): fail loudly when one moves.

The MoE trainers override TRL methods, private ones included, and call `super()` with the arguments they were written
against. A TRL release that renames, adds or reorders a parameter would shift those calls silently; these tests pin
every overridden method's parameter list, and find the overrides themselves, so a new override must be pinned too.
"""

from __future__ import annotations

import inspect
import json

import pytest
import trl
from conftest import digit_share, make_config
from datasets import Dataset
from trl import GRPOTrainer, SFTTrainer

from trl_moe_grpo import MoEGRPOTrainer, MoESFTConfig, MoESFTTrainer
from trl_moe_grpo.data_utils import sft_rows_from_answers
from trl_moe_grpo.testing import tiny_moe_model
from trl_moe_grpo.trainer.common import MoETrainerMixin

# Parameters (name, default) of each TRL / transformers method the trainers override, as of TRL 1.16 and
# transformers 5.23. Annotations are left out: they change without changing calls.
GRPO_SEAMS = {
    "__init__": (
        "self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None, processing_class=None, "
        "reward_processing_classes=None, callbacks=None, optimizers=(None, None), quantization_config=None, "
        "peft_config=None, tools=None, rollout_func=None, environment_factory=None"
    ),
    "_generate_single_turn": "self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False",
    "_generate_and_score_completions": "self, inputs",
    "_calculate_rewards": "self, inputs, prompts, completions, completion_ids_list",
    "_get_per_token_logps_and_entropies": (
        "self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, "
        "compute_aux_loss=False, pixel_values=None, image_grid_thw=None, num_images=None, pixel_attention_mask=None, "
        "spatial_shapes=None, num_tiles=None, image_sizes=None, token_type_ids=None, mm_token_type_ids=None, "
        "image_position_ids=None"
    ),
    "_compute_loss": "self, model, inputs",
    "training_step": "self, model, inputs, num_items_in_batch",
    "prediction_step": "self, model, inputs, prediction_loss_only, ignore_keys=None",
    "evaluation_loop": (
        "self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix='eval'"
    ),
    "train": "self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None",
    "_save": "self, output_dir=None, state_dict=None",
    "create_optimizer": "self, model=None",
    "create_scheduler": "self, num_training_steps, optimizer=None",
    "_generate": "self, prompts",
}
SFT_SEAMS = {
    "__init__": (
        "self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None, "
        "compute_loss_func=None, compute_metrics=None, callbacks=None, optimizers=(None, None), "
        "optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None, quantization_config=None, "
        "peft_config=None, formatting_func=None"
    ),
    "compute_loss": "self, model, inputs, return_outputs=False, num_items_in_batch=None",
    "training_step": "self, *args, **kwargs",
    "_save": "self, output_dir=None, state_dict=None",
    "create_optimizer": "self, model=None",
    "create_scheduler": "self, num_training_steps, optimizer=None",
}


def parameters(function) -> str:
    return ", ".join(
        str(p.replace(annotation=inspect.Parameter.empty)) for p in inspect.signature(function).parameters.values()
    )


def overridden(ours: tuple[type, ...], base: type) -> set[str]:
    """Names of the methods our classes define that `base` (TRL's trainer, through its bases) also has."""
    return {
        name
        for cls in ours
        for name, value in vars(cls).items()
        if callable(value) and hasattr(base, name) and not (name.startswith("__") and name != "__init__")
    }


@pytest.mark.parametrize(
    ("ours", "base", "seams"),
    [
        ((MoEGRPOTrainer, MoETrainerMixin), GRPOTrainer, GRPO_SEAMS),
        ((MoESFTTrainer, MoETrainerMixin), SFTTrainer, SFT_SEAMS),
    ],
    ids=["grpo", "sft"],
)
def test_overridden_methods_keep_their_signatures(ours, base, seams):
    overrides = overridden(ours, base)
    unpinned = overrides - set(seams)
    assert not unpinned, f"Pin the signatures of the newly overridden {base.__name__} methods: {sorted(unpinned)}"
    changed = {
        name: (expected, parameters(getattr(base, name)))
        for name, expected in seams.items()
        if parameters(getattr(base, name)) != expected
    }
    assert not changed, (
        f"TRL {trl.__version__} changed the signature of methods this project overrides; update the overrides (and "
        "the pin in setup.cfg) before relaxing these: "
        + "; ".join(f"{name}: expected ({old}), found ({new})" for name, (old, new) in changed.items())
    )


def test_the_overrides_found_are_the_ones_the_project_knows():
    """The discovery above sees the five private GRPO seams (a broken discovery would pin nothing)."""
    private = {
        "_generate_single_turn",
        "_generate_and_score_completions",
        "_calculate_rewards",
        "_get_per_token_logps_and_entropies",
        "_compute_loss",
    }
    assert private <= overridden((MoEGRPOTrainer, MoETrainerMixin), GRPOTrainer)


# ---------------------------------------------------------------------- output_router_logits, which TRL rewrites


@pytest.mark.parametrize("users_value", [True, False])
def test_grpo_saved_config_keeps_output_router_logits(tmp_path, tokenizer, dataset, users_value):
    model = tiny_moe_model("qwen3_moe", seed=1)
    model.config.output_router_logits = users_value
    trainer = MoEGRPOTrainer(
        model, digit_share, args=make_config(tmp_path), train_dataset=dataset, processing_class=tokenizer
    )
    assert trainer.model.config.output_router_logits is False  # off while training: the hooks do the balance loss
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["output_router_logits"] is users_value
    assert trainer.model.config.output_router_logits is False


@pytest.mark.parametrize("coef", [0.0, 0.01])
def test_sft_saved_config_keeps_output_router_logits(tmp_path, tokenizer, coef):
    """TRL's SFTTrainer rewrites the flag to match its aux loss (here the opposite of the user's value for coef 0)."""
    model = tiny_moe_model("qwen3_moe", seed=1)
    model.config.output_router_logits = True
    rows = sft_rows_from_answers(Dataset.from_list([{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]))
    args = MoESFTConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", router_aux_loss_coef=coef, max_steps=1
    )
    trainer = MoESFTTrainer(model, args=args, train_dataset=rows, processing_class=tokenizer)
    assert trainer.model.config.output_router_logits is False
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["output_router_logits"] is True
