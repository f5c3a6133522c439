"""Train an MoE model with MoE-GRPO from a TRL-style YAML recipe.

    accelerate launch recipes/train.py --config recipes/quickstart.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_process.yaml recipes/train.py \
        --config recipes/quickstart.yaml

The recipe holds `MoEGRPOConfig` fields, TRL's `ModelConfig` fields and the `ScriptArguments` below; a key none of them
knows is an error (a typo must not be silently ignored). Command-line flags override the recipe. With `report: true`
the script measures held-out accuracy per task, routing entropy and expert utilization before and after training and
writes `report.json`, `reward_curve.png` and `expert_utilization.png` to `output_dir`. Every run writes `run_info.json`
there: what actually ran (world size, distributed type, the model's wrapper class, the DeepSpeed ZeRO stage).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from trl import ModelConfig, TrlParser, get_peft_config

from trl_moe_grpo import MoEGRPOConfig, MoEGRPOError, MoEGRPOTrainer


@dataclass
class ScriptArguments:
    """
    Arguments of the training script that are not training or model options.

    Parameters:
        dataset_name (`str`, *optional*, defaults to `"visual_mc"`):
            `visual_mc` (the project's generated multi-task visual multiple-choice data), a dataset folder
            (`save_to_disk`), a data file (json, jsonl, csv, parquet) or a hub name.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split to train on.
        dataset_test_split (`str`, *optional*, defaults to `"test"`):
            Held-out split for the report.
        num_train_examples (`int`, *optional*, defaults to `2048`):
            Size of the generated `visual_mc` training split.
        num_test_examples (`int`, *optional*, defaults to `128`):
            Size of the generated `visual_mc` test split, and the number of held-out rows the report uses.
        dataset_seed (`int`, *optional*, defaults to `0`):
            Seed of the generated `visual_mc` data.
        report (`bool`, *optional*, defaults to `True`):
            Measure held-out accuracy, routing entropy and expert utilization before and after training.
    """

    dataset_name: str = field(default="visual_mc", metadata={"help": "'visual_mc', a dataset folder, file or name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Held-out split for the report."})
    num_train_examples: int = field(default=2048, metadata={"help": "Size of the generated visual_mc train split."})
    num_test_examples: int = field(default=128, metadata={"help": "Held-out rows (and generated test split size)."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the generated visual_mc data."})
    report: bool = field(default=True, metadata={"help": "Measure and report before/after training."})


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, MoEGRPOConfig, ModelConfig))


def parse(argv: list[str] | None = None) -> tuple[ScriptArguments, MoEGRPOConfig, ModelConfig]:
    """Parse a recipe and flags; unknown keys are an error that names them."""
    try:
        return make_parser().parse_args_and_config(argv, fail_with_unknown_args=True)
    except ValueError as error:
        message = str(error).rstrip(".")
        if "Unknown arguments" in message:
            message += (
                ". Every key must be a field of MoEGRPOConfig, trl.ModelConfig or this script's ScriptArguments "
                "(see `python recipes/train.py --help`)"
            )
        raise MoEGRPOError(f"Malformed recipe or arguments: {message}.") from error


def load_data(script_args: ScriptArguments):
    from trl_moe_grpo.loading import load_dataset_split

    options = {}
    if script_args.dataset_name == "visual_mc":
        sizes = {"num_train": script_args.num_train_examples, "num_test": script_args.num_test_examples}
        options = {**sizes, "seed": script_args.dataset_seed}
    train = load_dataset_split(script_args.dataset_name, script_args.dataset_train_split, **options)
    test = load_dataset_split(script_args.dataset_name, script_args.dataset_test_split, **options)
    return train, test


def load_model(model_args: ModelConfig, trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    kwargs = {"trust_remote_code": trust_remote_code, "revision": model_args.model_revision}
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **kwargs)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = auto.from_pretrained(
        model_args.model_name_or_path, dtype=dtype, attn_implementation=model_args.attn_implementation, **kwargs
    )
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, **kwargs)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # TRL left-pads prompts; the processor must agree
    return model, processor


def skip_deepspeed_shm_comm_build() -> None:
    """Keep DeepSpeed on CPU from compiling its shared-memory all-reduce op when it starts up.

    On DeepSpeed's CPU accelerator, its torch communication backend builds the `deepspeed_shm_comm` C++ extension at
    distributed start-up: ~100 s the first time on a 2-core machine. Only DeepSpeed inference's
    `inference_all_reduce` uses it; training's collectives go through torch.distributed (gloo) either way. Marking
    the op incompatible skips the build. Must run before DeepSpeed's communication starts (the training arguments
    can start it).
    """
    from accelerate.utils import is_deepspeed_available

    # accelerate's check, not `find_spec`: a folder named `deepspeed` on `sys.path` is not the package.
    if not is_deepspeed_available():
        return
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def start_deepspeed_comm() -> None:
    """Start DeepSpeed's communication layer before a ZeRO-3 model loads, where `use_cpu` left it off.

    Under a ZeRO-3 config `from_pretrained` partitions the weights as it loads them (`deepspeed.zero.Init`) and takes
    the world size from `deepspeed.comm`. On GPUs accelerate starts it with the process group; with `use_cpu`
    (DeepSpeed on CPU) it starts only torch.distributed (gloo), so DeepSpeed would count one process and fail its
    batch-size check (`16 != 8 * 1 * 1`). Started here, it reuses the gloo process group.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    import deepspeed

    if not deepspeed.comm.is_initialized():
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        deepspeed.init_distributed(dist_backend=backend)


def write_run_info(trainer: MoEGRPOTrainer, output_dir: str) -> dict:
    """Write `run_info.json`: what ran (world size, distributed type, the model's wrapper, the ZeRO stage)."""
    accelerator = trainer.accelerator
    wrapped = trainer.model_wrapped
    info = {
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "backend": accelerator.state.backend,
        "device": str(accelerator.device),
        "model_wrapped": type(wrapped).__name__,
        "zero_stage": wrapped.zero_optimization_stage() if hasattr(wrapped, "zero_optimization_stage") else None,
    }
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def main(argv: list[str] | None = None) -> dict | None:
    from trl_moe_grpo.training_report import format_report, measure, write_report
    from trl_moe_grpo.visual_mc import accuracy_reward
    from trl_moe_grpo.zero3 import gathered_parameters

    skip_deepspeed_shm_comm_build()
    script_args, training_args, model_args = parse(argv)
    start_deepspeed_comm()
    model, processor = load_model(model_args, training_args.trust_remote_code)
    train, test = load_data(script_args)
    held_out = [test[i] for i in range(min(script_args.num_test_examples, len(test)))]

    trainer = MoEGRPOTrainer(
        model,
        reward_funcs=[accuracy_reward],
        args=training_args,
        train_dataset=train,
        processing_class=processor,
        peft_config=get_peft_config(model_args),
    )
    batch = training_args.per_device_eval_batch_size
    # Every process measures (ZeRO-3 needs all ranks in each forward); only the main process writes.
    before = None
    if script_args.report:
        with gathered_parameters(trainer.routing_model):
            before = measure(trainer.routing_model, trainer.routing, processor, held_out, accuracy_reward, batch)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        write_run_info(trainer, training_args.output_dir)
    if not script_args.report:
        return None
    after = measure(trainer.routing_model, trainer.routing, processor, held_out, accuracy_reward, batch)
    if trainer.accelerator.is_main_process:
        report = write_report(before, after, trainer.state.log_history, training_args.output_dir)
        print(format_report(report))
        return report
    return None


if __name__ == "__main__":
    try:
        main()
    except MoEGRPOError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
