"""Train a Mixture-of-Experts model with MoE-GRPO: TRL's GRPO training script (`trl/scripts/grpo.py`) for MoE models.

    trl-moe-grpo train --config recipes/quickstart.yaml
    trl-moe-grpo train --config my_recipe.yaml --accelerate_config multi_process
    accelerate launch recipes/train.py --config recipes/quickstart.yaml        (the same script)

A recipe holds `GRPOScriptArguments` (below: dataset, rewards, report), `MoEGRPOConfig` (every `trl.GRPOConfig` key
plus MoE-GRPO's) and `trl.ModelConfig` keys, so a TRL GRPO recipe runs unchanged. Unlike TRL's script, a key none of
them knows is an error that names it: a typo must not be silently ignored. Command-line flags override the recipe.

The model is loaded by the trainer from `model_name_or_path` with `model_init_kwargs` built from the `ModelConfig`
(dtype, attention implementation, revision, 4/8-bit quantization) as TRL's script builds them; causal LMs and
vision-language (image-text-to-text) models both load this way.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import logging
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from trl_moe_grpo.errors import MoEGRPOError
from trl_moe_grpo.trainer.grpo_config import MoEGRPOConfig

logger = logging.get_logger(__name__)


@dataclass
class GRPOScriptArguments(DatasetMixtureConfig, ScriptArguments):
    """
    Arguments of the MoE-GRPO training script: TRL's `ScriptArguments` (`dataset_name`, `dataset_config`,
    `dataset_train_split`, `dataset_test_split`, `dataset_streaming`), TRL's dataset mixtures (`datasets`,
    `streaming`, `test_split_size`, loaded with `trl.get_dataset`) and the fields below.

    `dataset_name` is what TRL's script loads with `datasets.load_dataset` (a hub name, a folder of data files), or a
    folder saved with `save_to_disk`, or a data file (json, jsonl, csv, parquet: the file is the split asked for).
    The test split is loaded only when it is used: for evaluation (`eval_strategy` other than `"no"`) or the report.

    Parameters:
        > Parameters that control the rewards

        reward_funcs (`list[str]`, *optional*):
            Reward functions, each a name or a dotted import path (`my_lib.rewards.custom_reward`, importable from
            the working directory). Names: TRL's script's (`accuracy_reward`, `reasoning_accuracy_reward`,
            `think_format_reward`, `get_soft_overlong_punishment` with `max_completion_len=1280`,
            `soft_punish_cache=256`). Weighted by `reward_weights`.
        reward_model_name_or_path (`str`, *optional*):
            A reward model (hub name or local folder), used before the reward functions, as in TRL's script.

        > Parameters that control the before/after report

        report (`bool`, *optional*, defaults to `False`):
            Evaluate on the test split before and after training (`trainer.evaluate()`: held-out reward per task,
            routing entropies, task-wise JSD, expert utilization; all logged to `report_to`) and write
            `report.json`, `reward_curve.png` and `expert_utilization.png` to `output_dir` (`MoEReportCallback`;
            the figures need the `plots` extra), then print a table.

        > Parameters that control the dataset's size

        max_train_samples (`int` or `None`, *optional*, defaults to `None`):
            Train on the first `max_train_samples` rows of the train split only (all of them when `None`).
        max_eval_samples (`int` or `None`, *optional*, defaults to `None`):
            Evaluate (and report) on the first `max_eval_samples` rows of the test split only.

        > Parameters that control diagnostics

        write_run_info (`bool`, *optional*, defaults to `False`):
            Write `run_info.json` to `output_dir`: what actually ran (world size, distributed type, backend, device,
            the model's wrapper class, the DeepSpeed ZeRO stage). On CPU accelerate can silently start one process or
            leave DeepSpeed off; this file shows it.
    """

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: TRL's script's names (`accuracy_reward`, `reasoning_accuracy_reward`, "
            "`think_format_reward`, `get_soft_overlong_punishment`) or any dotted import path (e.g. "
            "`my_lib.rewards.custom_reward`)."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reward model: a hub name or a local folder saved with `save_pretrained`."},
    )
    report: bool = field(
        default=False,
        metadata={
            "help": "Evaluate before and after training (held-out reward per task, routing measures); write "
            "report.json, reward_curve.png and expert_utilization.png to output_dir."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N rows of the train split only."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate and report on the first N rows of the test split only."}
    )
    write_run_info: bool = field(
        default=False,
        metadata={"help": "Write run_info.json (world size, distributed type, model wrapper, ZeRO stage)."},
    )


class RecipeParser(TrlParser):
    """`TrlParser` whose `parse_args_and_config` rejects unknown recipe keys and flags with an error naming them.

    TRL's own script passes `fail_with_unknown_args=False`, which ignores a mistyped recipe key; here it is an error
    unless a caller asks for the remaining strings. Parsing training arguments that name a DeepSpeed config can start
    DeepSpeed's communication, so DeepSpeed on CPU is first kept from compiling an op training never uses
    (`distributed.skip_deepspeed_shm_comm_build`).
    """

    def parse_args_and_config(
        self,
        args=None,
        return_remaining_strings: bool = False,
        fail_with_unknown_args: bool = True,
        separate_remaining_strings: bool = False,
    ):
        from trl_moe_grpo.distributed import skip_deepspeed_shm_comm_build

        skip_deepspeed_shm_comm_build()
        check_recipe_exists(list(args) if args is not None else sys.argv[1:])
        if return_remaining_strings or not fail_with_unknown_args:
            return super().parse_args_and_config(
                args, return_remaining_strings, fail_with_unknown_args, separate_remaining_strings
            )
        *parsed, from_recipe, from_command_line = super().parse_args_and_config(
            args, return_remaining_strings=True, separate_remaining_strings=True
        )
        check_no_unknown_arguments(from_recipe, from_command_line)
        return tuple(parsed)


def check_recipe_exists(argv: list[str]) -> None:
    """Raise an error naming the recipe when `--config` names no file (TRL would raise a bare `FileNotFoundError`)."""
    if "--config" not in argv:
        return
    index = argv.index("--config") + 1
    if index >= len(argv):
        raise MoEGRPOError("`--config` needs a recipe file: `--config recipe.yaml`.")
    if not os.path.isfile(argv[index]):
        raise MoEGRPOError(
            f"Recipe {argv[index]!r} not found (from {os.getcwd()}): pass the path of a YAML recipe, e.g. "
            "`--config recipes/quickstart.yaml`."
        )


def check_no_unknown_arguments(from_recipe: list[str], from_command_line: list[str], launcher: str = "") -> None:
    """Raise an error naming the recipe keys and command-line flags no argument class knows."""
    problems = []
    if from_recipe:  # `TrlParser` turns each unknown recipe key into `["--key", "value"]`
        problems.append(f"unknown recipe key(s) {', '.join(key[2:] for key in from_recipe[::2])}")
    if from_command_line:
        flags = [item for item in from_command_line if item.startswith("-")] or from_command_line
        problems.append(f"unknown argument(s) {' '.join(flags)}")
    if problems:
        problem = "; ".join(problems)
        raise MoEGRPOError(
            f"{problem[0].upper()}{problem[1:]}. Every key must be a field of MoEGRPOConfig, trl.ModelConfig or the "
            f"script's GRPOScriptArguments{launcher} (`trl-moe-grpo train --help` lists them)."
        )


def make_parser(prog: str | None = None, epilog: str | None = None) -> TrlParser:
    """The parser of this script's three argument classes; `--config recipe.yaml` reads a recipe. Flags are matched
    exactly (no abbreviations: `--learning_rat` is an error, not `--learning_rate`)."""
    dataclass_types = (GRPOScriptArguments, MoEGRPOConfig, ModelConfig)
    return RecipeParser(dataclass_types, prog=prog, epilog=epilog, allow_abbrev=False)


# ---------------------------------------------------------------------------------------------------------- rewards


def reward_funcs_registry() -> dict[str, Callable]:
    """Reward functions by name: TRL's script's, resolved as it resolves them."""
    from trl.rewards import (
        accuracy_reward,
        get_soft_overlong_punishment,
        reasoning_accuracy_reward,
        think_format_reward,
    )

    return {
        "accuracy_reward": accuracy_reward,
        "reasoning_accuracy_reward": reasoning_accuracy_reward,
        "think_format_reward": think_format_reward,
        "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
    }


def resolve_reward_funcs(script_args: GRPOScriptArguments) -> list[Callable | str]:
    """The trainer's `reward_funcs`: the reward model (if any), then each reward function by name or dotted path."""
    reward_funcs: list[Callable | str] = []
    if script_args.reward_model_name_or_path:
        reward_funcs.append(script_args.reward_model_name_or_path)
    reward_funcs += [load_reward_function(name) for name in script_args.reward_funcs or []]
    if not reward_funcs:
        raise MoEGRPOError(
            "No reward: name reward functions (e.g. `reward_funcs: [accuracy_reward]`, or a dotted path to your "
            "own) or a `reward_model_name_or_path`."
        )
    return reward_funcs


def load_reward_function(name: str) -> Callable:
    """A reward function by name (TRL's script's, `reward_funcs_registry`) or dotted import path."""
    registry = reward_funcs_registry()
    if name in registry:
        return registry[name]
    if "." in name:
        return _import_reward(name)
    raise MoEGRPOError(
        f"Unknown reward function {name!r}: expected one of {sorted(registry)} or a dotted import path "
        "(e.g. `my_lib.rewards.custom_reward`)."
    )


def _import_reward(path: str) -> Callable:
    module_path, name = path.rsplit(".", 1)
    if os.getcwd() not in sys.path:  # as TRL's script: a module beside the recipe imports
        sys.path.insert(0, os.getcwd())
    try:
        reward = getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError) as error:
        raise MoEGRPOError(f"Could not load reward function {path!r}: {error}.") from error
    if not callable(reward):
        raise MoEGRPOError(f"Reward function {path!r} is a {type(reward).__name__}, not a function.")
    return reward


# ------------------------------------------------------------------------------------------------------------ model


def quantization_options(model_args: ModelConfig, training_args: MoEGRPOConfig) -> tuple[Any, dict[str, Any]]:
    """`(quantization_config, model_init_kwargs additions)` for `load_in_4bit` / `load_in_8bit`, or `(None, {})`.

    bitsandbytes quantizes on CUDA GPUs only: without one (or with `use_cpu`) the option is an error, not ignored.
    Each process loads its quantized model on its own GPU (TRL's `get_kbit_device_map`).
    """
    import torch
    from trl import get_quantization_config

    quantization_config = get_quantization_config(model_args)
    if quantization_config is None:
        return None, {}
    option = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
    if training_args.use_cpu or not torch.cuda.is_available():
        where = "`use_cpu` is set" if training_args.use_cpu else "no CUDA device is available"
        raise MoEGRPOError(
            f"`{option}` quantizes the model with bitsandbytes, which needs a CUDA GPU, and {where}. Remove "
            f"`{option}` (and train in `dtype: float32` or `bfloat16`), or run on a GPU."
        )
    from accelerate import PartialState

    return quantization_config, {"device_map": {"": PartialState().local_process_index}}


def model_init_kwargs(model_args: ModelConfig, training_args: MoEGRPOConfig, quantized: dict) -> dict[str, Any]:
    """What the trainer passes to `from_pretrained`, as TRL's script builds it; the recipe's own
    `model_init_kwargs` win."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
        **quantized,
    )
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


# ------------------------------------------------------------------------------------------------------------- data


def load_splits(script_args: GRPOScriptArguments, splits: list[str]) -> dict[str, Any]:
    """The named splits of the script's dataset: a mixture (`datasets`, loaded by TRL's `get_dataset`) or
    `dataset_name` (`trl_moe_grpo.loading.load_dataset_split`)."""
    from trl import get_dataset

    from trl_moe_grpo.loading import DATA_FILE_BUILDERS, load_dataset_split

    if script_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are set: loading `datasets`, ignoring `dataset_name`.")
        mixture = get_dataset(script_args)
        missing = [split for split in splits if split not in mixture]
        if missing:
            raise MoEGRPOError(
                f"The dataset mixture has splits {list(mixture)}, not {missing}: set `test_split_size` to hold out a "
                "test split (needed for evaluation and the report), or name the splits it has."
            )
        return {split: mixture[split] for split in splits}
    if not script_args.dataset_name:
        raise MoEGRPOError("No dataset: set `dataset_name` or a `datasets` mixture.")
    if len(set(splits)) > 1 and os.path.splitext(script_args.dataset_name)[1] in DATA_FILE_BUILDERS:
        logger.warning(
            f"`dataset_name` is one data file ({script_args.dataset_name}): each split is all of its rows, so "
            "evaluation and the report see the training rows. A folder of data files (`train.jsonl`, `test.jsonl`) "
            "or `test_split_size` with a `datasets` mixture holds rows out."
        )
    return {
        split: load_dataset_split(
            script_args.dataset_name, split, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
        for split in splits
    }


def first_rows(dataset, count: int | None):
    """The first `count` rows of a dataset (streamed or not); all of it when `count` is `None`."""
    if count is None:
        return dataset
    if count < 1:
        raise MoEGRPOError(f"`max_train_samples` and `max_eval_samples` must be at least 1, got {count}.")
    if hasattr(dataset, "take"):  # `IterableDataset`
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


# ------------------------------------------------------------------------------------------------------------- main


def main(script_args: GRPOScriptArguments, training_args: MoEGRPOConfig, model_args: ModelConfig) -> dict | None:
    """Train as TRL's GRPO script does, with `MoEGRPOTrainer`; return the report on the main process (if asked)."""
    from trl import get_peft_config

    from trl_moe_grpo.distributed import start_deepspeed_comm, write_run_info
    from trl_moe_grpo.trainer.callbacks import MoEReportCallback
    from trl_moe_grpo.trainer.grpo_trainer import MoEGRPOTrainer

    if not model_args.model_name_or_path:
        raise MoEGRPOError("No model: set `model_name_or_path` (a hub name or a local folder).")
    quantization_config, quantized = quantization_options(model_args, training_args)
    reward_funcs = resolve_reward_funcs(script_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args, quantized)

    evaluate = training_args.eval_strategy != "no"
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    splits = load_splits(script_args, [train_split] + ([test_split] if evaluate or script_args.report else []))
    train_dataset = first_rows(splits[train_split], script_args.max_train_samples)
    eval_dataset = first_rows(splits[test_split], script_args.max_eval_samples) if test_split in splits else None

    # ZeRO-3 partitions the weights as they load and takes the world size from DeepSpeed's communication: start it.
    start_deepspeed_comm()
    trainer = MoEGRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=quantization_config,
        peft_config=get_peft_config(model_args),
    )

    report = MoEReportCallback(trainer) if script_args.report else None
    if report is not None:
        trainer.add_callback(report)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("✅ Training completed.")

    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"💾 Model saved to {training_args.output_dir}.")
    if script_args.write_run_info and trainer.accelerator.is_main_process:
        write_run_info(trainer, training_args.output_dir)

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    # Finish the trackers and destroy the process group, all processes together: a rank that tears the group down
    # while another still writes the report made the other abort under DeepSpeed on CPU.
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return report.report if report is not None else None


def run_from_command_line() -> None:
    """Train from the command line's recipe and flags; a `MoEGRPOError` exits with code 2 and its one-line message."""
    parser = make_parser()
    try:
        script_args, training_args, model_args = parser.parse_args_and_config()
    except ValueError as error:  # ours, or a value TRL or transformers refuse (their messages name the fix)
        parser.exit(2, f"error: {error}\n")
    try:
        main(script_args, training_args, model_args)
    except MoEGRPOError as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    run_from_command_line()
