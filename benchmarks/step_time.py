"""Step cost of MoE-GRPO and R3 against TRL's `GRPOTrainer`, measured in the same run, interleaved, with a breakdown.

Three trainers (one per arm) train copies of the same randomly initialized Qwen3-MoE (built from a config, no
download) on the same prompts. Every completion has exactly `--completion` tokens (`min_new_tokens`), so each arm
processes the same tokens; the script checks it. After `--warmup` steps per arm, the arms take turns: each repeat
times `--steps` optimizer steps of every arm, in an order that rotates from repeat to repeat, so a slow spell of a
noisy machine falls on every arm alike. Each repeat gives a ratio to `trl.GRPOTrainer`; the table reports the
median ratio over repeats and its spread (min-max), and the median time of each phase of a step.

Clock (`--clock`): on CPU the default is this process's CPU time (`time.process_time`, every thread of the process),
not wall time. On a shared machine another process takes the cores away from whichever arm happens to run, which
moves wall-clock ratios by tens of percent; CPU time counts only the work this process did (one torch thread by
default), so the ratios hold under load. `--clock wall` gives wall time; on a GPU wall time (with the device
synchronized around every timed region) is the only meaningful clock and the default.

Phases:

- generation: `_generate_single_turn` (the model's `generate`, with the routing hooks for the MoE arms), of which
  trace building (`split_rollout_routes`, `pad_routes`);
- scoring forward: no-grad forwards TRL runs while scoring rollouts (old log-probs; none with one iteration per
  generation and `beta=0`);
- rewards and the rest of `_prepare_inputs` (decoding, rewards, advantages);
- training forward: the forward with gradients (replaying the trace for the MoE arms);
- routing losses: Gate-GRPO and the balance loss on the captured routing (`_routing_loss`);
- other loss math: TRL's token loss and bookkeeping;
- backward and optimizer step.

    python benchmarks/step_time.py                              # default size (hidden 512, 8 layers, 8 experts)
    python benchmarks/step_time.py --sweep                      # how the ratios grow with L, N, K and tokens
    python benchmarks/step_time.py --device cuda --dtype bfloat16 --hidden 1024 --layers 16 --experts 64
    python benchmarks/step_time.py --memory                     # also each arm's peak memory, in its own process
    python benchmarks/step_time.py --smoke                      # seconds: the tests run this

Memory (`--memory`): each arm trains in a fresh process of this script (arms sharing one process would share the
allocator's high-water mark, so a later arm would inherit an earlier arm's peak), with glibc mapping every large
allocation on its own (`MALLOC_ENV`) so that the resident size follows the live tensors. After the warm-up steps the
peak is reset (`VmHWM` through `/proc/self/clear_refs` on Linux; `torch.cuda.reset_peak_memory_stats` on a GPU),
then `--steps` steps run; the step's memory is that peak minus the memory in use before them (weights, optimizer
state).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from stats import median_range

ARMS: dict[str, dict | None] = {
    "trl.GRPOTrainer": None,
    "R3 (top-K rollouts, replay)": {"rollout_routing": "topk", "gate_loss_coef": 0.0},
    "MoE-GRPO (sampled, replay, Gate-GRPO)": {},
}
PHASES = {
    "generate": "generation",
    "trace": "  of which trace building",
    "score": "scoring forward (no grad)",
    "prepare_rest": "rewards, rest of scoring",
    "forward": "training forward",
    "routing_loss": "routing losses",
    "loss_rest": "other loss math",
    "backward": "backward + optimizer",
}
# One axis at a time around the base size: how the overhead grows with layers, experts, K and completion length.
SWEEP = {
    "base": {},
    "layers 4": {"layers": 4},
    "layers 16": {"layers": 16},
    "experts 16": {"experts": 16},
    "experts 32": {"experts": 32},
    "top-K 4": {"top_k": 4},
    "top-K 8": {"top_k": 8},
    "completion 32": {"completion": 32},
    "completion 128": {"completion": 128},
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-size", type=int, default=None, help="experts' intermediate size (default hidden)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="rollouts per prompt (G)")
    parser.add_argument("--completion", type=int, default=64, help="tokens per completion (all of them)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=2, help="steps per arm per round")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch (1: steadier timings on a shared machine)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--clock",
        default="auto",
        choices=["auto", "cpu", "wall"],
        help="cpu: this process's CPU time; wall: elapsed time; auto (default): cpu on CPU, wall on a GPU",
    )
    parser.add_argument("--sweep", action="store_true", help="one table row per size of SWEEP")
    parser.add_argument("--memory", action="store_true", help="also measure each arm's peak step memory (own process)")
    parser.add_argument("--memory-arm", type=int, default=None, help=argparse.SUPPRESS)  # the child of --memory
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 2 rounds of 1 step: seconds")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


# ----------------------------------------------------------------------------------------------------- model, arms


def moe_config(args: argparse.Namespace):
    from trl_moe_grpo.testing import tiny_moe_config

    return tiny_moe_config(
        "qwen3_moe",
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.expert_size or args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 128, 1),
        head_dim=64 if args.hidden >= 64 else args.hidden,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )


def build_model(args: argparse.Namespace):
    from trl_moe_grpo.testing import tiny_moe_model

    model = tiny_moe_model("qwen3_moe", seed=0, config=moe_config(args))
    return model.to(device=args.device, dtype=getattr(torch, args.dtype))


def build_trainer(arm_options: dict | None, model, args: argparse.Namespace, output_dir: str):
    from trl import GRPOConfig, GRPOTrainer

    from trl_moe_grpo import MoEGRPOConfig, MoEGRPOTrainer
    from trl_moe_grpo.demo.digit_sum import accuracy_reward, digit_sum_dataset
    from trl_moe_grpo.testing import build_char_tokenizer

    cpu = args.device == "cpu"
    common = dict(
        output_dir=output_dir,
        max_steps=10**6,
        per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations,
        max_completion_length=args.completion,
        generation_kwargs={"min_new_tokens": args.completion},  # every completion has the same length
        learning_rate=1e-5,
        save_strategy="no",
        report_to="none",
        use_cpu=cpu,
        bf16=args.dtype == "bfloat16",
        disable_tqdm=True,
        seed=0,
    )
    trainer_class, config_class = (GRPOTrainer, GRPOConfig) if arm_options is None else (MoEGRPOTrainer, MoEGRPOConfig)
    trainer = trainer_class(
        model,
        accuracy_reward,
        args=config_class(**common, **(arm_options or {})),
        train_dataset=digit_sum_dataset(4096),
        processing_class=build_char_tokenizer(),
    )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


# ----------------------------------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_clock(args: argparse.Namespace) -> Callable[[], float]:
    """The timer of `--clock`: process CPU time or wall time, in seconds."""
    kind = args.clock if args.clock != "auto" else ("wall" if args.device.startswith("cuda") else "cpu")
    if kind == "cpu" and args.device.startswith("cuda"):
        raise SystemExit("--clock cpu measures host work only; on a GPU use wall time (--clock wall or auto).")
    return time.process_time if kind == "cpu" else time.perf_counter


@dataclass
class PhaseClock:
    """Seconds per phase, accumulated by wrappers the benchmark puts on the trainer's methods (not the library)."""

    device: str
    now: Callable[[], float] = time.perf_counter
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def wrap(self, owner, name: str, phase: Callable[[], str] | str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            key = phase() if callable(phase) else phase
            synchronize(self.device)
            start = self.now()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.totals[key] += self.now() - start

        setattr(owner, name, timed)


def instrument(trainer, clock: PhaseClock) -> None:
    clock.wrap(trainer, "_generate_single_turn", "generate")
    clock.wrap(trainer, "_prepare_inputs", "prepare")
    clock.wrap(trainer, "_compute_loss", "compute_loss")
    clock.wrap(
        trainer, "_get_per_token_logps_and_entropies", lambda: "forward" if torch.is_grad_enabled() else "score"
    )
    if hasattr(trainer, "_routing_loss"):
        clock.wrap(trainer, "_routing_loss", "routing_loss")


@contextlib.contextmanager
def trace_building_timed(clock: PhaseClock, trace_sizes: list[float]):
    """Time the trace functions where the trainer calls them (module globals of `grpo_trainer`), and note the bytes
    per token of every trace `pad_routes` builds."""
    from trl_moe_grpo.trainer import grpo_trainer

    originals = {name: getattr(grpo_trainer, name) for name in ("split_rollout_routes", "pad_routes")}

    def pad_and_measure(*args, **kwargs):
        trace = originals["pad_routes"](*args, **kwargs)  # [batch, tokens, layers, top_k]
        trace_sizes.append(trace.element_size() * trace[0, 0].numel())
        return trace

    grpo_trainer.pad_routes = pad_and_measure
    for name in originals:
        clock.wrap(grpo_trainer, name, "trace")
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(grpo_trainer, name, function)


@dataclass
class Arm:
    name: str
    trainer: object
    batches: object
    clock: PhaseClock
    step_times: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    completion_lengths: set[float] = field(default_factory=set)

    def step(self) -> tuple[float, dict[str, float]]:
        """One optimizer step: `(seconds, seconds per phase)`. Python's garbage collector runs before the step, not
        in it, so a collection never lands on one arm's clock."""
        trainer = self.trainer
        self.clock.totals.clear()
        gc.collect()
        gc.disable()
        try:
            synchronize(self.clock.device)
            start = self.clock.now()
            trainer.training_step(trainer.model, next(self.batches), None)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            synchronize(self.clock.device)
            seconds = self.clock.now() - start
        finally:
            gc.enable()
        self.completion_lengths.update(trainer._metrics["train"]["completions/mean_length"])
        trainer._metrics["train"].clear()
        return seconds, split_phases(dict(self.clock.totals), seconds)


def split_phases(totals: dict[str, float], step: float) -> dict[str, float]:
    """The measured wrappers nest; turn them into the disjoint phases of `PHASES`."""
    get = totals.get
    forward, routing = get("forward", 0.0), get("routing_loss", 0.0)
    return {
        "generate": get("generate", 0.0),
        "trace": get("trace", 0.0),
        "score": get("score", 0.0),
        "prepare_rest": get("prepare", 0.0) - get("generate", 0.0) - get("score", 0.0),
        "forward": forward,
        "routing_loss": routing,
        "loss_rest": get("compute_loss", 0.0) - forward - routing,
        "backward": step - get("prepare", 0.0) - get("compute_loss", 0.0),
    }


def endless_batches(trainer):
    while True:
        yield from trainer.get_train_dataloader()


def measure(args: argparse.Namespace) -> dict:
    """Train every arm interleaved; return per-arm step times, phases and per-repeat ratios."""
    torch.manual_seed(0)
    base = build_model(args)
    arms, trace_sizes = [], []
    now = make_clock(args)
    with trace_building_timed(clock := PhaseClock(args.device, now), trace_sizes):
        for index, (name, options) in enumerate(ARMS.items()):
            trainer = build_trainer(
                options, copy.deepcopy(base), args, f"/tmp/moe-grpo-step-time-{os.getpid()}-{index}"
            )
            arm_clock = clock if options is not None else PhaseClock(args.device, now)
            instrument(trainer, arm_clock)
            arms.append(Arm(name, trainer, endless_batches(trainer), arm_clock))
        # Every MoE arm shares `clock` for the trace functions; arms run one at a time, so totals never mix.
        for arm in arms:
            for _ in range(args.warmup):
                arm.step()
        for repeat in range(args.repeats):
            order = arms[repeat % len(arms) :] + arms[: repeat % len(arms)]
            for arm in order:
                times, phases = zip(*(arm.step() for _ in range(args.steps)))
                arm.step_times.append(sum(times) / len(times))
                arm.phases.append({k: sum(p[k] for p in phases) / len(phases) for k in PHASES})
    lengths = {arm.name: sorted(arm.completion_lengths) for arm in arms}
    if any(length != [float(args.completion)] for length in lengths.values()):
        raise RuntimeError(f"Completion lengths differ from {args.completion} tokens: {lengths}")
    reference = arms[0].step_times
    return {
        "arms": {
            arm.name: {
                "step_median": statistics.median(arm.step_times),
                "ratios": [mine / theirs for mine, theirs in zip(arm.step_times, reference)],
                "phases": {k: statistics.median(p[k] for p in arm.phases) for k in PHASES},
            }
            for arm in arms
        },
        "tokens_per_step": args.prompts * args.generations * args.completion,
        # Bytes of one token's routing trace in the batch (`[layers, top_k]` ids); the target is 2 L K (int16).
        "trace_bytes_per_token": sorted(set(trace_sizes)),
        "trace_bytes_target": 2 * args.layers * args.top_k,
    }


# ----------------------------------------------------------------------------------------------------- memory


def resident_mb() -> float:
    """Current resident memory of this process, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (Linux >= 4.0)
            f.write("5")


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def in_use_mb(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else resident_mb()


def arm_memory(args: argparse.Namespace) -> dict:
    """Run in a child process: one arm's memory in use before its steps, and its peaks during them (MiB) over the
    generation, forward and backward (`training_step`) and over the whole step (with the optimizer's update)."""
    name, options = list(ARMS.items())[args.memory_arm]
    trainer = build_trainer(options, build_model(args), args, f"/tmp/moe-grpo-step-memory-{os.getpid()}")
    arm = Arm(name, trainer, endless_batches(trainer), PhaseClock(args.device))
    for _ in range(max(args.warmup, 1)):  # the optimizer's state exists from the first step on
        arm.step()
    gc.collect()
    before = in_use_mb(args.device)
    training_step_peak = peak = 0.0
    for _ in range(args.steps):
        reset_peak(args.device)
        trainer.training_step(trainer.model, next(arm.batches), None)
        training_step_peak = max(training_step_peak, peak_mb(args.device))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        peak = max(peak, peak_mb(args.device))
    return {
        "before_mb": before,
        "peak_mb": peak,
        "step_mb": peak - before,
        "training_step_mb": training_step_peak - before,
    }


# glibc serves allocations of 64 KiB and more (every tensor that matters) from their own mappings and returns them on
# free, so the resident size follows the live tensors instead of the allocator's cached heap (otherwise an arm's
# "step memory" moves by tens of MiB with allocation order). Linux and glibc only; elsewhere the variable is ignored.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
SIZE_FLAGS = ("hidden", "layers", "experts", "top_k", "expert_size", "prompts", "generations", "completion")
RUN_FLAGS = ("warmup", "steps", "device", "threads", "dtype", "clock")


def measure_memory(args: argparse.Namespace) -> dict[str, dict]:
    """Each arm in a fresh process of this script, at the size of `args`: `{arm: {before_mb, peak_mb, step_mb,
    training_step_mb}}`."""
    flags = [
        item
        for key in SIZE_FLAGS + RUN_FLAGS
        if getattr(args, key) is not None
        for item in (f"--{key.replace('_', '-')}", str(getattr(args, key)))
    ]
    result = {}
    for index, name in enumerate(ARMS):
        child = subprocess.run(
            [sys.executable, __file__, *flags, "--memory-arm", str(index)],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **MALLOC_ENV},
        )
        if child.returncode != 0:
            raise RuntimeError(f"The memory run of {name!r} failed:\n{child.stdout[-2000:]}{child.stderr[-2000:]}")
        result[name] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def format_memory(memory: dict[str, dict]) -> str:
    reference = memory["trl.GRPOTrainer"]

    def cell(m: dict, key: str) -> str:
        return f"{m[key]:.0f} ({m[key] / reference[key]:.3f}x)" if reference[key] > 0 else f"{m[key]:.0f}"

    lines = [
        "| arm | in use before the steps, MiB | generation + forward + backward, MiB above that (x GRPOTrainer) | "
        "whole step with the optimizer, MiB above (x GRPOTrainer) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, m in memory.items():
        lines.append(f"| {name} | {m['before_mb']:.0f} | {cell(m, 'training_step_mb')} | {cell(m, 'step_mb')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- report


def describe(args: argparse.Namespace) -> str:
    return (
        f"Qwen3-MoE hidden {args.hidden}, {args.layers} layers, {args.experts} experts, top-{args.top_k}, expert size "
        f"{args.expert_size or args.hidden}; {args.prompts} prompts x {args.generations} rollouts x {args.completion} "
        f"tokens per step; {args.device} {args.dtype}"
        + (f", {args.threads} thread(s)" if args.device == "cpu" else "")
        + f"; clock: {make_clock(args).__name__}"
        + f"; {args.repeats} rounds x {args.steps} steps after "
        f"{args.warmup} warm-up steps per arm"
    )


def format_table(result: dict) -> str:
    arms = result["arms"]
    names = list(arms)
    lines = [
        "| arm | step s (median) | x GRPOTrainer: median (min-max over rounds) |",
        "| --- | ---: | ---: |",
    ]
    for name in names:
        lines.append(f"| {name} | {arms[name]['step_median']:.3f} | {median_range(arms[name]['ratios'])} |")
    lines += ["", "| phase (median s per step) | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for key, label in PHASES.items():
        lines.append(f"| {label} | " + " | ".join(f"{arms[n]['phases'][key]:.3f}" for n in names) + " |")
    lines.append("")
    lines.append(
        f"tokens per step (every arm): {result['tokens_per_step']}; routing trace: "
        f"{result['trace_bytes_per_token']} bytes per token (2 L K = {result['trace_bytes_target']})"
    )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"
    return f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, load average {load}"


def write_json(path: str | None, data: dict) -> None:
    if path is not None:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


def measure_size(args: argparse.Namespace) -> dict:
    """Time (and with `--memory`, measure the memory of) every arm at one size; print its tables."""
    result = measure(args)
    print(format_table(result), flush=True)
    if args.memory:
        result["memory"] = measure_memory(args)
        print("\n" + format_memory(result["memory"]), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.experts, args.completion = 64, 2, 4, 4
        args.prompts, args.generations, args.warmup, args.repeats, args.steps = 1, 2, 1, 2, 1
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_arm is not None:
        print(json.dumps(arm_memory(args)))
        return {}
    print(machine())
    if not args.sweep:
        print(describe(args))
        result = measure_size(args)
        write_json(args.json, {"machine": machine(), "setting": describe(args), **result})
        return result
    rows = {}
    for label, changes in SWEEP.items():
        sized = argparse.Namespace(**{**vars(args), **changes})
        print(f"\n## {label}: {describe(sized)}", flush=True)
        rows[label] = {"setting": describe(sized), **measure_size(sized)}
    names = list(ARMS)[1:]
    columns = [f"{n}: x GRPOTrainer" for n in names]
    if args.memory:
        columns += [f"{n}: memory (generation, forward, backward) x GRPOTrainer" for n in names]
    print("\n| size | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for label, result in rows.items():
        cells = [median_range(result["arms"][n]["ratios"]) for n in names]
        if args.memory:
            reference = result["memory"]["trl.GRPOTrainer"]["training_step_mb"]
            cells += [f"{result['memory'][n]['training_step_mb'] / reference:.3f}" for n in names]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(machine())
    write_json(
        args.json,
        {
            "machine": machine(),
            "sizes": {
                k: {"setting": describe(argparse.Namespace(**{**vars(args), **SWEEP[k]})), **v}
                for k, v in rows.items()
            },
        },
    )
    return rows


if __name__ == "__main__":
    main()
