"""Rebuild the quickstart's bundled starting point from nothing, reproducibly by seed (under two minutes on 2 cores;
the reasoning build below, about ten on a loaded 2-core machine: 1000 fine-tuning steps of longer sequences).

1. A tiny dense InternVL-style vision-language model (InternViT-style vision tower, pixel-shuffle projector, Qwen3
   language model) with the project's character tokenizer and an `InternVLProcessor`: 56x56 images in 7x7 patches,
   pixel-shuffled into 16 image tokens.
2. A brief supervised fine-tune on the multi-task visual multiple-choice training split (`visual_mc`: four one-image
   tasks, a four-frame video task and a four-image task), stopped as soon as the validation accuracy is clearly above
   chance (25%) on every task and overall, or reaches `--max-accuracy` overall, far from saturated, so that
   reinforcement learning has room to act. (With seed 0 the four-image `find` task is still at chance when the cap
   stops it: the report says so per task.)
3. Upcycling of its language model into a Qwen3-MoE (8 experts, top-2) by the project's own upcycler, `noise` init
   with `--noise-std 0.3`: the upcycler's default (0.01) keeps the experts so alike that the rollouts of a prompt
   almost never disagree on this tiny model, which leaves MoE-GRPO nothing to learn from (the report measures both).
   The dense and upcycled models are evaluated on the held-out test split (greedy, stock top-K), and the upcycled one
   also under sampled routing: 8 greedy rollouts per prompt, each routed by sampling, as MoE-GRPO rolls out. Prompts
   with both correct and wrong rollouts are what give MoE-GRPO a learning signal.

Everything lands in `--output`, with `build_report.json`.

    python scripts/build_bundled_model.py --output bundled/tiny-internvl-moe
    python scripts/build_bundled_model.py --output bundled/tiny-internvl-moe-reason --tasks colour shape count \
        position motion find tally --max-new-tokens 64

The second build adds the reasoning task `tally` to the fine-tuning mix: its rows are supervised on their whole
reference completion (`solution`: the objects named in reading order, then the count and the letter), so the model
writes several tokens of working before the answer and the routing of every generated token can change the reward.
Validation counts a row as right when greedy decoding would reproduce its reference completion exactly (every
supervised token is the argmax given the reference before it, EOS aside); for one-letter rows that is the first-token
accuracy. The report then measures the share of prompts whose sampled-routing rollouts disagree in reward (the
route sensitivity), per task.

Two settings matter for the fine-tune to learn the multi-task problem at all (see `make_parser` and `dense_model`):
weights start at std 0.1 and AdamW runs at 1e-3 with a warm-up. With transformers' default std 0.02 and lr 3e-3 every
Adam step moves each weight by ~15% of its size: the noise drowns the task-conditional structure (which letter depends
on the question *and* the image) and the model sits at the answer-letter marginal (loss ln(4)/2 per supervised token,
25% on every task) for 1000+ steps; single-task training, which needs no conditioning, still learns.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from trl_moe_grpo.analysis.accuracy import evaluate_accuracy
from trl_moe_grpo.data_utils import calibration_batches, encode_conversations
from trl_moe_grpo.demo.visual_mc import ALL_TASKS, TASKS, accuracy_reward, visual_mc_rows
from trl_moe_grpo.routing import RoutingController
from trl_moe_grpo.testing import build_tiny_internvl_processor
from trl_moe_grpo.upcycle import ExpertInit, upcycle

IMAGE_SIZE, PATCH_SIZE = 56, 7
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2 // 4  # pixel shuffle by 0.5 in each direction: 16 tokens
INIT_STD = 0.1  # every weight matrix; at 0.02 Adam's steps are too large relative to the weights (see above)
# The splits: `visual_mc_dataset(seed=s)` trains on `s` and tests on `s + 10_000`; early stopping uses a third one.
TEST_OFFSET, VALIDATION_OFFSET = 10_000, 20_000


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bundled/tiny-internvl-moe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=2048, help="training rows (the quickstart's train split)")
    parser.add_argument("--max-sft-steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=10, help="validation check every this many steps")
    parser.add_argument("--target-accuracy", type=float, default=0.55, help="stop once overall validation >= this")
    parser.add_argument("--min-task-accuracy", type=float, default=0.35, help="... and every task >= this")
    parser.add_argument("--max-accuracy", type=float, default=0.7, help="stop at this overall accuracy regardless")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument(
        "--noise-std",
        type=float,
        default=0.3,
        help="expert noise of the upcycler's `noise` init, relative to each weight's std (its default, 0.01, leaves "
        "the experts of this tiny model so alike that sampled rollouts almost never disagree)",
    )
    parser.add_argument("--num-test", type=int, default=128, help="held-out rows for the report")
    parser.add_argument("--num-rollouts", type=int, default=8, help="sampled-routing rollouts per prompt")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(TASKS),
        choices=ALL_TASKS,
        help="visual_mc tasks of the fine-tuning mix and the test rows (default: the quickstart's six)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=2,
        help="tokens generated per test answer (a letter and EOS: 2; reasoning completions need ~64)",
    )
    return parser


def dense_model(processor, seed: int):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen3Config

    tokenizer = processor.tokenizer
    text = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        initializer_range=INIT_STD,
    )
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        initializer_range=INIT_STD,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        downsample_ratio=0.5,
        image_seq_length=IMAGE_SEQ_LENGTH,
        initializer_range=INIT_STD,  # the projector
    )
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration._from_config(config, dtype=torch.float32, attn_implementation="eager")


def completion(row: dict) -> str:
    """What a row is supervised on: its reference completion (`solution`, reasoning rows) or its answer letter."""
    return row.get("solution", row["answer"])


def supervised_batch(processor, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Prompt + completion + EOS, left-padded; the loss is on the completion and the EOS only."""
    from trl.data_utils import prepare_multimodal_messages

    conversations = [
        prepare_multimodal_messages(row["prompt"], images=row["images"])
        + [{"role": "assistant", "content": completion(row)}]
        for row in rows
    ]
    processor.tokenizer.padding_side = "left"
    inputs = encode_conversations(processor, conversations, add_generation_prompt=False)
    labels = torch.full_like(inputs["input_ids"], -100)
    for i, row in enumerate(rows):  # left padding: every row ends with "<completion><eos>"
        target = processor.tokenizer(completion(row), add_special_tokens=False)["input_ids"]
        length = len(target) + 1
        assert inputs["input_ids"][i, -length:-1].tolist() == target, "the completion is not where it was expected"
        labels[i, -length:] = inputs["input_ids"][i, -length:]
    return {**inputs, "labels": labels}


def encode_rows(processor, rows: list[dict], chunk: int = 256) -> dict[str, torch.Tensor]:
    """`supervised_batch` of all `rows` at once (in chunks), left-padded to one length: encoded once, sliced later.

    `image_owner` holds, for each image of `pixel_values`, the row it belongs to (a row may have several images).
    """
    parts = [supervised_batch(processor, rows[i : i + chunk]) for i in range(0, len(rows), chunk)]
    length = max(part["input_ids"].shape[1] for part in parts)
    pad_values = {"input_ids": processor.tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
    owners = torch.tensor([row for row, data in enumerate(rows) for _ in data["images"]])
    return {
        key: torch.cat([torch.nn.functional.pad(p[key], (length - p[key].shape[1], 0), value=value) for p in parts])
        for key, value in pad_values.items()
    } | {"pixel_values": torch.cat([p["pixel_values"] for p in parts]), "image_owner": owners}


def select(data: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    """Rows `index` of `data` with their images, without the columns that are padding in every selected row."""
    rows = torch.arange(len(data["input_ids"]))[index]
    batch = {key: data[key][rows] for key in ("input_ids", "attention_mask", "labels")}
    first = int(batch["attention_mask"].any(0).nonzero()[0])
    batch = {key: value[:, first:] for key, value in batch.items()}
    images = torch.cat([(data["image_owner"] == row).nonzero().flatten() for row in rows.tolist()])
    return batch | {"pixel_values": data["pixel_values"][images]}


@torch.no_grad()
def answer_accuracy(model, data: dict[str, torch.Tensor], tasks: list[str]) -> dict[str, float]:
    """Share of rows whose greedy completion is exactly the reference (EOS aside), in one teacher-forced pass: every
    supervised token is the most likely one given the reference before it. For a one-letter answer that is greedy
    decoding's first token."""
    model.eval()
    hits = []
    for start in range(0, len(tasks), 128):
        batch = select(data, slice(start, start + 128))
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        # Position t predicts token t + 1; the last label (EOS) is left out, as it always was.
        labels = batch["labels"][:, 1:-1]
        right = (logits[:, :-2].argmax(-1) == labels) | (labels == -100)
        hits.append(right.all(-1))
    model.train()
    hits = torch.cat(hits).float()
    accuracy = {"all": hits.mean().item()}
    for task in dict.fromkeys(tasks):
        accuracy[task] = hits[[i for i, t in enumerate(tasks) if t == task]].mean().item()
    return accuracy


def fine_tune(model, processor, args) -> tuple[int, dict[str, float]]:
    """AdamW with a linear warm-up, until validation accuracy is clearly above chance on every task (or the cap)."""
    tasks = tuple(args.tasks)
    train = encode_rows(processor, visual_mc_rows(args.num_train, seed=args.seed, tasks=tasks))
    validation_rows = visual_mc_rows(256, seed=args.seed + VALIDATION_OFFSET, tasks=tasks)
    validation = encode_rows(processor, validation_rows)
    validation_tasks = [row["task"] for row in validation_rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    accuracy, losses = {}, []
    for step in range(1, args.max_sft_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * min(1.0, step / args.warmup_steps)
        index = torch.randint(0, args.num_train, (args.batch_size,), generator=generator)
        loss = model(**select(train, index)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % args.eval_every == 0:
            accuracy = answer_accuracy(model, validation, validation_tasks)
            if step % (10 * args.eval_every) == 0:
                mean_loss = sum(losses[-10 * args.eval_every :]) / (10 * args.eval_every)
                print(f"sft step {step}: loss {mean_loss:.3f}, validation {fmt(accuracy)}", flush=True)
            every_task = min(accuracy[task] for task in tasks) >= args.min_task_accuracy
            if (accuracy["all"] >= args.target_accuracy and every_task) or accuracy["all"] >= args.max_accuracy:
                print(f"sft stopped at step {step}: validation {fmt(accuracy)}")
                return step, accuracy
    print(f"sft reached --max-sft-steps={args.max_sft_steps}: validation {fmt(accuracy)}")
    return args.max_sft_steps, accuracy


@torch.no_grad()
def sampled_routing_diversity(
    model, processor, rows: list[dict], num_rollouts: int, seed: int, max_new_tokens: int = 2
) -> dict[str, float]:
    """Greedy completions of `num_rollouts` sampled-routing rollouts per prompt, as MoE-GRPO rolls out, scored by the
    visual_mc reward (`accuracy_reward`: the letter named, or for reasoning rows the final letter of the format).

    Returns the share of prompts whose rollouts do not all commit to the same answer, the share with at least one
    rewarded and one unrewarded rollout (`some_correct_some_wrong`: the **route sensitivity**, the prompts whose
    group carries a learning signal), the share whose completions are not all the same text, and the mean reward of
    the rollouts; with more than one task, the route sensitivity of each task too.
    """
    from trl_moe_grpo.demo.visual_mc import REASONING_TASKS, parse_choice, parse_reasoning

    controller = RoutingController(model, vision_token_ids=[processor.tokenizer.context_image_token_id])
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    model.eval()
    differ, texts_differ, correct = 0, 0, 0.0
    mixed: dict[str, list[bool]] = {}
    try:
        repeated = [row for row in rows for _ in range(num_rollouts)]
        batch_size = 16 * num_rollouts
        for start, inputs in zip(
            range(0, len(repeated), batch_size), calibration_batches(processor, repeated, batch_size)
        ):
            with controller.rollout("sample"):
                generated = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            chunk = repeated[start : start + batch_size]
            for i in range(0, len(chunk), num_rollouts):
                row, group = chunk[i], texts[i : i + num_rollouts]
                parse = parse_reasoning if row["task"] in REASONING_TASKS else parse_choice
                rewards = accuracy_reward(
                    group, answer=[row["answer"]] * num_rollouts, task=[row["task"]] * num_rollouts
                )
                differ += len({parse(text) for text in group}) > 1
                texts_differ += len(set(group)) > 1
                mixed.setdefault(row["task"], []).append(0 < sum(rewards) < num_rollouts)
                correct += sum(rewards)
    finally:
        controller.remove()
    sensitive = [flag for flags in mixed.values() for flag in flags]
    result = {
        "num_prompts": len(rows),
        "num_rollouts": num_rollouts,
        "answers_not_all_equal": differ / len(rows),
        "some_correct_some_wrong": sum(sensitive) / len(rows),
        "rollout_accuracy": correct / (len(rows) * num_rollouts),
    }
    if max_new_tokens > 2:  # completions of several tokens: the text can differ where the answer does not
        result["completions_not_all_equal"] = texts_differ / len(rows)
    if len(mixed) > 1:
        result |= {f"some_correct_some_wrong/{task}": sum(flags) / len(flags) for task, flags in mixed.items()}
    return result


@torch.no_grad()
def reasoning_format_rate(model, processor, rows: list[dict], max_new_tokens: int) -> float | None:
    """Share of the reasoning rows whose greedy top-K completion has the reasoning format (`parse_reasoning`); None
    without reasoning rows."""
    from trl_moe_grpo.demo.visual_mc import REASONING_TASKS, parse_reasoning

    rows = [row for row in rows if row["task"] in REASONING_TASKS]
    if not rows:
        return None
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    model.eval()
    parsed = 0
    for inputs in calibration_batches(processor, rows, 64):
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        parsed += sum(parse_reasoning(text) is not None for text in texts)
    return parsed / len(rows)


def fmt(values: dict) -> str:
    return " ".join(
        f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}" for key, value in values.items()
    )


def upcycle_and_measure(dense_dir: str, output: Path, test: list[dict], args, noise_std: float):
    """Upcycle `dense_dir` into `output` (`noise` init with `noise_std`), load it as users do, and evaluate it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    result = upcycle(
        dense_dir,
        str(output),
        num_experts=args.num_experts,
        top_k=args.top_k,
        init=ExpertInit("noise", noise_std=noise_std, seed=args.seed),
        overwrite=True,
        progress=False,
    )
    moe = AutoModelForImageTextToText.from_pretrained(output)
    processor = AutoProcessor.from_pretrained(output)
    accuracy = evaluate_accuracy(moe, processor, test, accuracy_reward, max_new_tokens=args.max_new_tokens)
    if (rate := reasoning_format_rate(moe, processor, test, args.max_new_tokens)) is not None:
        accuracy["reasoning_format_rate"] = rate
    diversity = sampled_routing_diversity(moe, processor, test, args.num_rollouts, args.seed, args.max_new_tokens)
    print(f"upcycled, noise_std {noise_std}: held-out test (greedy, top-K) {fmt(accuracy)}")
    print(f"  sampled routing, {args.num_rollouts} greedy rollouts per prompt: {fmt(diversity)}")
    return result, rounded(accuracy), rounded(diversity)


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    start = time.time()
    torch.set_num_threads(min(torch.get_num_threads(), 2))  # the reference runs: 2 cores (results depend on it)
    processor = build_tiny_internvl_processor(IMAGE_SIZE, IMAGE_SEQ_LENGTH)
    model = dense_model(processor, args.seed)
    steps, validation = fine_tune(model, processor, args)
    sft_seconds = time.time() - start

    test = visual_mc_rows(args.num_test, seed=args.seed + TEST_OFFSET, tasks=tuple(args.tasks))
    dense = evaluate_accuracy(model, processor, test, accuracy_reward, max_new_tokens=args.max_new_tokens)
    if (rate := reasoning_format_rate(model, processor, test, args.max_new_tokens)) is not None:
        dense["reasoning_format_rate"] = rate
    print(f"dense model, held-out test (greedy, {len(test)} rows): {fmt(dense)}")

    output = Path(args.output)
    if output.exists():
        shutil.rmtree(output)
    with tempfile.TemporaryDirectory() as dense_dir, tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(dense_dir)
        processor.save_pretrained(dense_dir)
        # For the record: the upcycler's default noise, whose experts are too alike for rollouts to disagree here.
        default = upcycle_and_measure(dense_dir, Path(scratch) / "moe", test, args, ExpertInit().noise_std)
        result, upcycled, diversity = upcycle_and_measure(dense_dir, output, test, args, args.noise_std)
    print(f"upcycled ({result.conversion}): {result.output_bytes / 2**20:.2f} MiB of weights in {output}")

    report = {
        "seed": args.seed,
        "tasks": list(args.tasks),
        "max_new_tokens": args.max_new_tokens,
        "sft": {
            "steps": steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "warmup_steps": args.warmup_steps,
            "train_rows": args.num_train,
            "validation_accuracy": rounded(validation),
            "seconds": round(sft_seconds, 1),
        },
        "test_split": {"seed": args.seed + TEST_OFFSET, "rows": len(test)},
        "dense_test_accuracy": rounded(dense),
        "upcycled": {
            "conversion": result.conversion,
            "num_experts": args.num_experts,
            "top_k": args.top_k,
            "init": "noise",
            "noise_std": args.noise_std,
        },
        "upcycled_test_accuracy_topk": upcycled,
        "sampled_routing": diversity,
        "upcycler_default_noise_std": {
            "noise_std": ExpertInit().noise_std,
            "test_accuracy_topk": default[1],
            "sampled_routing": default[2],
        },
        "build_seconds": round(time.time() - start, 1),
    }
    (output / "build_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


def rounded(values: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) and math.isfinite(v) else v for k, v in values.items()}


if __name__ == "__main__":
    main()
