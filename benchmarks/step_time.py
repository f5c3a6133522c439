"""Time and memory of an MoE-GRPO training step against TRL's GRPOTrainer, measured in the same run.

Each variant trains the same randomly initialized Qwen3-MoE (built from a config, no download) for a few steps in its
own subprocess, so peak-memory readings do not mix. The table gives the mean optimizer-step time after warm-up and the
peak memory (GPU: `torch.cuda.max_memory_allocated`; CPU: growth of the process's max RSS), each with its ratio to
`trl.GRPOTrainer`.

    python benchmarks/step_time.py                       # CPU, small model
    python benchmarks/step_time.py --hidden 1024 --layers 8 --experts 8 --batch 16 --completion 128   # on a GPU
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

VARIANTS = {
    "trl.GRPOTrainer": None,
    "R3 (topk rollouts + replay)": {"rollout_routing": "topk", "gate_loss_coef": 0.0},
    "MoE-GRPO (sample + replay + gate)": {},
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="rollouts per step (per device)")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion", type=int, default=16, help="max completion length")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    return parser


def _run(name: str, options: dict | None, args: argparse.Namespace, queue: mp.Queue) -> None:
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_moe_grpo import MoEGRPOConfig, MoEGRPOTrainer
    from trl_moe_grpo.demo.digit_sum import accuracy_reward, digit_sum_dataset
    from trl_moe_grpo.testing import build_char_tokenizer, tiny_moe_config, tiny_moe_model

    cuda = torch.cuda.is_available()
    config = tiny_moe_config(
        "qwen3_moe",
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.hidden // 2,
        num_hidden_layers=args.layers,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        head_dim=args.hidden // 4,
    )
    model = tiny_moe_model("qwen3_moe", seed=0, config=config)
    common = dict(
        output_dir=f"/tmp/moe-grpo-bench-{abs(hash(name))}",
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch,
        num_generations=args.generations,
        max_completion_length=args.completion,
        generation_kwargs={"min_new_tokens": args.completion},  # equal lengths: compare like with like
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda,
        disable_tqdm=True,
        seed=0,
    )
    trainer_cls, config_cls = (GRPOTrainer, GRPOConfig) if options is None else (MoEGRPOTrainer, MoEGRPOConfig)
    trainer = trainer_cls(
        model,
        accuracy_reward,
        args=config_cls(**common, **(options or {})),
        train_dataset=digit_sum_dataset(512),
        processing_class=build_char_tokenizer(),
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start, self.rss = [], None, None

        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, state, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)
            if len(self.times) == args.warmup:
                self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                if cuda:
                    torch.cuda.reset_peak_memory_stats()

    timer = StepTimer()
    trainer.add_callback(timer)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.train()
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    measured = timer.times[args.warmup :]
    queue.put((name, sum(measured) / len(measured), peak_mb))


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    context = mp.get_context("spawn")
    results = {}
    for name, options in VARIANTS.items():
        queue = context.Queue()
        process = context.Process(target=_run, args=(name, options, args, queue))
        process.start()
        results[name] = queue.get()[1:]
        process.join()

    base_time, base_memory = results["trl.GRPOTrainer"]
    print(
        f"\nQwen3-MoE hidden={args.hidden} layers={args.layers} experts={args.experts} top_k={args.top_k}, "
        f"{args.batch} rollouts x {args.completion} tokens per step, mean of {args.steps} steps after {args.warmup}"
    )
    print(f"| {'variant':<36} | step s | x GRPO | peak MiB | x GRPO |")
    print(f"|{'-' * 38}|--------|--------|----------|--------|")
    for name, (step, memory) in results.items():
        memory_ratio = memory / base_memory if base_memory > 0 else float("nan")
        print(f"| {name:<36} | {step:6.3f} | {step / base_time:6.2f} | {memory:8.1f} | {memory_ratio:6.2f} |")


if __name__ == "__main__":
    main()
