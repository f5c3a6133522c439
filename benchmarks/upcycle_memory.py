"""Peak memory of `upcycle` against the sizes of the source and output checkpoints.

Builds a dense Qwen3 from a config (random weights, bf16, no download), saves it in several shards, then converts it
to an 8-expert Qwen3-MoE once per `--max-shard-size`, each conversion in a fresh subprocess. Peak memory is the growth
of the process's max RSS over its RSS just before the conversion (after torch and transformers are imported), so it
counts everything the conversion itself holds: source tensors, mapped source pages, experts and the output shard
being assembled.

    python benchmarks/upcycle_memory.py                                   # ~0.15 GB source, ~0.55 GB output
    python benchmarks/upcycle_memory.py --hidden 1024 --layers 28 --vocab 151936   # Qwen3-0.6B-sized source
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 3 x hidden (Qwen3-0.6B's ratio)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--source-shard-size", default="40MB")
    parser.add_argument("--max-shard-size", nargs="+", default=["5GB", "100MB"], help="output shard sizes to compare")
    return parser


def current_rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _convert(source: str, output: str, args: argparse.Namespace, max_shard_size: str, queue: mp.Queue) -> None:
    import torch  # noqa: F401  (imported before the baseline so it is not counted)
    import transformers  # noqa: F401

    from trl_moe_grpo.upcycle import upcycle

    baseline = current_rss_kb()
    start = time.perf_counter()
    result = upcycle(source, output, args.experts, args.top_k, max_shard_size=max_shard_size, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    queue.put((result.source_bytes, result.output_bytes, len(result.shards), (peak - baseline) * 1024, seconds))


def build_source(folder: str, args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=args.source_shard_size)


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    context = mp.get_context("spawn")  # a fresh interpreter per conversion: peaks do not mix
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "dense")
        process = context.Process(target=build_source, args=(source, args))
        process.start()
        process.join()
        rows = []
        for size in args.max_shard_size:
            queue = context.Queue()
            output = os.path.join(tmp, f"moe-{size}")
            process = context.Process(target=_convert, args=(source, output, args, size, queue))
            process.start()
            rows.append((size, *queue.get()))
            process.join()
    gb = 1e9
    print(f"Dense Qwen3 (hidden {args.hidden}, {args.layers} layers, bf16) -> Qwen3-MoE, {args.experts} experts")
    print()
    print("| --max-shard-size | source | output | output shards | peak RSS growth | peak / output | time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, source_bytes, output_bytes, shards, peak, seconds in rows:
        print(
            f"| {size} | {source_bytes / gb:.3f} GB | {output_bytes / gb:.3f} GB | {shards} | {peak / gb:.3f} GB "
            f"| {peak / output_bytes:.2f} | {seconds:.1f} s |"
        )


if __name__ == "__main__":
    main()
