"""Rollout throughput of transformers' `generate` with sampled routing against top-K routing, in the same run.

The same randomly initialized Qwen3-MoE (as in `step_time.py`) generates the same batch, laid out as GRPO lays out
its rollouts (`--prompts` random prompts, each repeated `--generations` times), every completion exactly
`--completion` greedy tokens long, in three ways that take turns (rotating order, `--repeats` rounds):

- stock: the model without a routing controller (the same model instance, its hooks removed);
- top-K recorded: the controller records every token's routes (`rollout("topk")`, what R3 rollouts do);
- sampled: Gumbel-top-K routing, recorded (`rollout("sample")`, MoE-GRPO's rollouts).

Tokens per second is generated tokens (batch x completion) over the time of `--clock` (as in `step_time.py`: this
process's CPU time on CPU, so other load does not move the ratios; wall time on a GPU); the table gives the median
over rounds and each way's ratio to top-K recorded (target for sampled: >= 0.95) and to stock.

    python benchmarks/rollout_throughput.py
    python benchmarks/rollout_throughput.py --device cuda --dtype bfloat16 --hidden 1024 --layers 16 --experts 64
    python benchmarks/rollout_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
from collections.abc import Iterator

import torch
from stats import median_range
from step_time import build_model, describe, machine, make_clock, synchronize, write_json
from step_time import make_parser as step_time_parser

from trl_moe_grpo.routing import RoutingController
from trl_moe_grpo.routing.controller import RolloutRecording

WAYS = ("stock", "top-K recorded", "sampled")


def make_parser() -> argparse.ArgumentParser:
    parser = step_time_parser()
    parser.description = __doc__
    parser.set_defaults(prompts=4, generations=4, completion=64, repeats=5)
    return parser


def distinct_experts_per_decode_step(steps: list[torch.Tensor]) -> float:
    """Mean over decode calls (the prefill excluded) and layers of how many experts the call's tokens used: in
    transformers' expert loop each one is a matmul of its own, so this is what the experts' compute scales with."""
    counts = [
        len(torch.unique(call[:, :, layer])) for call in steps[1:] for layer in range(call.shape[2])
    ]  # call: [batch, 1, layers, top_k]
    return statistics.fmean(counts) if counts else float("nan")


@contextlib.contextmanager
def routed(model, way: str) -> Iterator[RolloutRecording | None]:
    """`way` on `model`: no controller at all for `stock` (hooks removed), else a controller's recorded rollout."""
    if way == "stock":
        yield None
        return
    controller = RoutingController(model)
    try:
        with controller.rollout("topk" if way == "top-K recorded" else "sample") as recording:
            yield recording
    finally:
        controller.remove()


def generate(model, way: str, input_ids, args) -> tuple[float, float | None]:
    """`(seconds, distinct experts per decode step)` to generate `args.completion` tokens for every row of
    `input_ids` in `way` (no expert count for `stock`, which records nothing)."""
    now = make_clock(args)
    gc.collect()
    with torch.no_grad(), routed(model, way) as recording:  # hooks installed before the clock starts
        synchronize(args.device)
        start = now()
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=args.completion,
            min_new_tokens=args.completion,
            do_sample=False,
            pad_token_id=0,
        )
        synchronize(args.device)
        seconds = now() - start
    assert output.shape[1] == input_ids.shape[1] + args.completion
    return seconds, (None if recording is None else distinct_experts_per_decode_step(recording.steps))


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = build_model(args).eval()  # one model for every way: the stock one is the same instance, unhooked
    batch = args.prompts * args.generations
    # GRPO's rollout batch: each prompt `generations` times in a row. With greedy tokens, the top-K rollouts of one
    # prompt are identical (and use the same experts); sampled ones diverge, which is the point of sampling them.
    prompts = torch.randint(4, model.config.vocab_size, (args.prompts, 8), device=args.device)
    input_ids = prompts.repeat_interleave(args.generations, dim=0)
    for way in WAYS:  # warm-up
        generate(model, way, input_ids, args)
    seconds = {way: [] for way in WAYS}
    distinct = {way: [] for way in WAYS}
    for repeat in range(args.repeats):
        order = WAYS[repeat % 3 :] + WAYS[: repeat % 3]
        for way in order:
            took, experts = generate(model, way, input_ids, args)
            seconds[way].append(took)
            if experts is not None:
                distinct[way].append(experts)
    tokens = batch * args.completion
    throughput = {way: [tokens / s for s in seconds[way]] for way in WAYS}
    return {
        "tokens_per_round": tokens,
        "tokens_per_second": {way: statistics.median(values) for way, values in throughput.items()},
        "ratio_to_topk": {
            way: [mine / theirs for mine, theirs in zip(throughput[way], throughput["top-K recorded"])] for way in WAYS
        },
        "distinct_experts_per_decode_step": {way: statistics.fmean(v) for way, v in distinct.items() if v},
        "ratio_to_stock": {
            way: [mine / theirs for mine, theirs in zip(throughput[way], throughput["stock"])] for way in WAYS
        },
    }


def format_table(result: dict) -> str:
    lines = [
        "| routing | tokens/s (median) | x top-K recorded: median (min-max) | x stock | experts used per layer and "
        "decode step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for way in WAYS:
        experts = result["distinct_experts_per_decode_step"].get(way)
        lines.append(
            f"| {way} | {result['tokens_per_second'][way]:.1f} | {median_range(result['ratio_to_topk'][way])} | "
            f"{median_range(result['ratio_to_stock'][way])} | {'-' if experts is None else f'{experts:.2f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.experts, args.completion = 64, 2, 4, 4
        args.prompts, args.generations, args.repeats = 1, 2, 2
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    print(machine())
    print(describe(args).split(";")[0] + f"; {args.prompts * args.generations} sequences x {args.completion} tokens")
    result = measure(args)
    print(format_table(result))
    write_json(args.json, {"machine": machine(), **result})
    return result


if __name__ == "__main__":
    main()
