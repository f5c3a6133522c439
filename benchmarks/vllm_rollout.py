"""Rollout tokens/s: transformers `generate` against vLLM (colocate, in-process), each with sampled and top-K routing.

One randomly initialized Qwen3-MoE built from a config (saved in bf16 to a temporary folder) and one batch of random
prompts, every completion exactly `--completion` tokens long (greedy, EOS ignored), generated four ways that take
turns (rotating order, `--repeats` rounds) in one run:

- HF top-K / HF sampled: transformers' `generate` under the routing controller (`rollout("topk")`, what R3 rollouts
  do, and `rollout("sample")`, MoE-GRPO's), routes recorded, in `--hf_dtype` (the trainer's generation runs the
  training model: fp32 by default);
- vLLM top-K / vLLM sampled: `LLM.generate` (bf16, eager, no prefix caching, as `MoEVLLMGeneration` builds it) with
  the router hook in `topk` / `sample` mode, and every request's routes turned into its trace (`to_trace`) inside
  the timed region, as the trainer does.

Tokens/s is generated tokens (batch x completion) over this process's CPU time (`--clock process`, the default, so
other load on a shared machine does not move the ratios; vLLM runs in this process) or wall time (`--clock wall`).
Printed: median tokens/s per way, sampled / top-K on each engine per round (median, min-max; target >= 0.95), vLLM /
HF with the same routing, and how many distinct experts a decode step's batch uses per layer (HF's recorded routes):
with G rollouts per prompt and greedy tokens, top-K rollouts of a prompt are the same tokens and share their experts,
sampled ones spread over more, so each step computes more experts (`--generations 1` takes that out).

Run in the vLLM environment (`bash scripts/vllm_env.sh`):

    VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/vllm_rollout.py
    .venv-vllm/bin/python benchmarks/vllm_rollout.py --smoke      # seconds: tests_vllm runs it
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine, as TRL's colocate mode

import torch
from stats import median_range

WAYS = ("HF top-K", "HF sampled", "vLLM top-K", "vLLM sampled")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers, every one MoE")
    parser.add_argument("--experts", type=int, default=8, help="experts per layer (top-2)")
    parser.add_argument("--expert_width", type=int, default=512, help="moe_intermediate_size (a multiple of 32)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--completion", type=int, default=64, help="tokens generated per rollout")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each way runs once per round")
    parser.add_argument("--hf_dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--clock", choices=("process", "wall"), default="process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that every way runs")
    return parser


def build_model(args: argparse.Namespace, path: str):
    """A seeded Qwen3-MoE of the requested size (by default `benchmarks/step_time.py`'s), saved to `path` in bf16."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.expert_width,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),  # the shape of benchmarks/step_time.py's model
        num_key_value_heads=max(args.hidden // 128, 1),
        head_dim=64,  # vLLM's CPU attention takes head dims 32, 64, ...
        num_experts=args.experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=args.prompt_length + args.completion + 8,
        tie_word_embeddings=False,
        initializer_range=0.1,  # routing that matters, as in the test models (trl_moe_grpo.testing)
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    from trl_moe_grpo.testing import build_char_tokenizer

    build_char_tokenizer().save_pretrained(path)  # vLLM wants a tokenizer; token ids go in directly


def make_clock(args: argparse.Namespace):
    return time.process_time if args.clock == "process" else time.perf_counter


class HFEngine:
    """transformers `generate` of the saved model under the routing controller."""

    def __init__(self, path: str, args: argparse.Namespace):
        from transformers import AutoModelForCausalLM

        from trl_moe_grpo.routing import RoutingController

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.hf_dtype)).eval()
        self.controller = RoutingController(self.model)
        self.args = args

    def generate(self, prompts: list[list[int]], mode: str) -> int:
        """Generate for every prompt; returns the number of routed (token, layer) sets recorded."""
        args = self.args
        input_ids = torch.tensor(prompts)
        with torch.no_grad(), self.controller.rollout(mode) as recording:
            output = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=args.completion,
                min_new_tokens=args.completion,
                do_sample=False,
                pad_token_id=0,
            )
        assert output.shape[1] == input_ids.shape[1] + args.completion
        # Distinct experts a decode step's batch uses, per layer: what each step's expert compute scales with (under
        # top-K with greedy tokens the G rollouts of a prompt are the same tokens, so they share their experts).
        decode = torch.stack([step[:, 0] for step in recording.steps[1:]])  # [steps, batch, layers, K]
        used = [
            len(torch.unique(decode[s, :, layer])) for s in range(decode.shape[0]) for layer in range(decode.shape[2])
        ]
        self.distinct_experts = sum(used) / len(used)
        return sum(int((step[..., 0] >= 0).sum()) for step in recording.steps)  # step: [batch, tokens, layers, K]


class VLLMEngine:
    """vLLM in this process, built as `MoEVLLMGeneration` builds it, with the router hook."""

    def __init__(self, path: str, args: argparse.Namespace):
        from vllm import LLM, SamplingParams

        from trl_moe_grpo.vllm_routing.check import check_vllm_internals
        from trl_moe_grpo.vllm_routing.engine_hooks import VLLMRouting
        from trl_moe_grpo.vllm_routing.generation import ENGINE_KWARGS

        check_vllm_internals()
        self.llm = LLM(
            model=path,
            max_model_len=args.prompt_length + args.completion + 8,
            max_num_seqs=args.prompts * args.generations,
            max_num_batched_tokens=4096,  # TRL's colocate value
            seed=0,
            logprobs_mode="processed_logprobs",
            **ENGINE_KWARGS,
        )
        self.routing = VLLMRouting(self.llm)
        self.params = SamplingParams(
            temperature=0.0, max_tokens=args.completion, min_tokens=args.completion, ignore_eos=True, logprobs=0
        )

    def generate(self, prompts: list[list[int]], mode: str) -> int:
        from trl_moe_grpo.vllm_routing.requests import to_trace

        self.routing.mode = mode
        self.routing.book.clear()
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], sampling_params=self.params, use_tqdm=False
        )
        recorded = 0
        for output in outputs:
            completion = output.outputs[0].token_ids
            assert len(completion) == self.params.max_tokens
            prompt_routes, completion_routes = to_trace(
                self.routing.book.pop(output.request_id), len(output.prompt_token_ids), len(completion)
            )
            recorded += int((prompt_routes[..., 0] >= 0).sum() + (completion_routes[..., 0] >= 0).sum())
        return recorded


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as path:
        build_model(args, path)
        engines = {"HF": HFEngine(path, args), "vLLM": VLLMEngine(path, args)}
        generator = torch.Generator().manual_seed(0)
        unique = torch.randint(4, args.vocab, (args.prompts, args.prompt_length), generator=generator).tolist()
        prompts = [p for p in unique for _ in range(args.generations)]  # G rollouts per prompt, as TRL batches
        clock = make_clock(args)

        def run(way: str) -> tuple[float, int]:
            engine, routing = way.split()
            mode = "topk" if routing == "top-K" else "sample"
            start = clock()
            recorded = engines[engine].generate(prompts, mode)
            return clock() - start, recorded

        for way in WAYS:  # warm-up
            run(way)
        seconds = {way: [] for way in WAYS}
        recorded, distinct = {}, {}
        for repeat in range(args.repeats):
            order = WAYS[repeat % len(WAYS) :] + WAYS[: repeat % len(WAYS)]
            for way in order:
                elapsed, recorded[way] = run(way)
                seconds[way].append(elapsed)
                if way.startswith("HF"):
                    distinct[way] = engines["HF"].distinct_experts
    tokens = len(prompts) * args.completion
    throughput = {way: [tokens / s for s in values] for way, values in seconds.items()}
    ratios = {
        f"{engine} sampled / top-K": [
            s / k for s, k in zip(throughput[f"{engine} sampled"], throughput[f"{engine} top-K"], strict=True)
        ]
        for engine in ("HF", "vLLM")
    }
    for routing in ("top-K", "sampled"):
        ratios[f"vLLM / HF, {routing}"] = [
            v / h for v, h in zip(throughput[f"vLLM {routing}"], throughput[f"HF {routing}"], strict=True)
        ]
    return {
        "tokens_per_round": tokens,
        "tokens_per_second": {way: statistics.median(values) for way, values in throughput.items()},
        "ratios": ratios,
        # Per engine, the routed tokens whose expert sets were recorded (every layer), in the last round.
        "recorded_token_layers": recorded,
        # HF, last round: mean distinct experts per (decode step, layer) over the batch.
        "distinct_experts_per_decode_step": distinct,
    }


def format_table(result: dict) -> str:
    lines = ["| way | tokens/s (median) |", "| --- | ---: |"]
    lines += [f"| {way} | {value:.1f} |" for way, value in result["tokens_per_second"].items()]
    lines += ["", "| ratio | median (min-max) over rounds |", "| --- | ---: |"]
    for name, values in result["ratios"].items():
        lines.append(f"| {name} | {median_range(values)} |")
    used = ", ".join(f"{way} {value:.2f}" for way, value in result["distinct_experts_per_decode_step"].items())
    lines += ["", f"Distinct experts per decode step and layer (HF, last round): {used}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.experts, args.expert_width, args.vocab = 64, 2, 8, 32, 128
        args.prompts, args.generations, args.prompt_length, args.completion, args.repeats = 2, 2, 8, 8, 1
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        f"Qwen3-MoE hidden {args.hidden}, {args.layers} layers x {args.experts} experts (top-2, width "
        f"{args.expert_width}); {args.prompts} prompts x {args.generations} rollouts x {args.completion} tokens; "
        f"HF {args.hf_dtype}, vLLM bfloat16; clock {args.clock}"
    )
    result = measure(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
