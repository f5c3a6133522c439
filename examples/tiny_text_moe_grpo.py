"""MoE-GRPO end to end on a laptop CPU: a tiny Qwen3-MoE learns the last digit of a sum.

The script builds everything itself (no download): a character tokenizer, a 2-layer Qwen3-MoE with 8 experts and top-2
routing, and the `3+9=` -> `2` task. A short supervised warm start brings the model to partial accuracy (RL needs some
successes to compare), then `MoEGRPOTrainer` trains with sampled routing, replay, Token-GRPO and Gate-GRPO on the
accuracy reward. Accuracy is `trainer.evaluate()` before and after: top-K routing and greedy decoding, as at inference.

    python examples/tiny_text_moe_grpo.py --max-steps 60
"""

from __future__ import annotations

import argparse
import time

import torch

from trl_moe_grpo import MoEGRPOConfig, MoEGRPOTrainer
from trl_moe_grpo.demo.digit_sum import accuracy_reward, digit_sum_dataset
from trl_moe_grpo.testing import build_char_tokenizer, tiny_moe_model


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/tiny_text_moe_grpo")
    parser.add_argument("--max-steps", type=int, default=60, help="MoE-GRPO optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=200, help="supervised warm-start steps")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def warm_start(model, tokenizer, dataset, steps: int, seed: int) -> None:
    """A few supervised steps on `prompt + answer + <eos>` so the policy starts above chance, as an SFT model would."""
    generator = torch.Generator().manual_seed(seed)
    texts = [row["prompt"] + row["answer"] + tokenizer.eos_token for row in dataset]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = [texts[i] for i in torch.randint(len(texts), (32,), generator=generator).tolist()]
        inputs = tokenizer(batch, return_tensors="pt", padding=True)
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = make_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer = build_char_tokenizer()
    train, test = digit_sum_dataset(512, seed=args.seed), digit_sum_dataset(200, seed=args.seed + 1)
    model = tiny_moe_model("qwen3_moe", seed=args.seed)

    warm_start(model, tokenizer, train, args.warmup_steps, args.seed)

    config = MoEGRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=32,
        num_generations=8,
        max_completion_length=3,
        logging_steps=10,
        # Held-out accuracy as at inference: greedy decoding (`greedy_eval`), top-K routing, one answer per prompt.
        num_generations_eval=1,
        per_device_eval_batch_size=100,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=args.seed,
    )
    trainer = MoEGRPOTrainer(
        model, accuracy_reward, args=config, train_dataset=train, eval_dataset=test, processing_class=tokenizer
    )
    before = trainer.evaluate()["eval_reward"]
    start = time.perf_counter()
    trainer.train()
    minutes = (time.perf_counter() - start) / 60
    after = trainer.evaluate()["eval_reward"]

    logs = [log for log in trainer.state.log_history if "routing/entropy" in log]
    report = {
        "held_out_accuracy_before": before,
        "held_out_accuracy_after": after,
        "routing_entropy_first_log": logs[0]["routing/entropy"],
        "routing_entropy_last_log": logs[-1]["routing/entropy"],
        "train_minutes": minutes,
    }
    print("\nMoE-GRPO on the tiny text task (held-out accuracy: greedy decoding, top-K routing)")
    for key, value in report.items():
        print(f"  {key:<28} {value:.3f}")
    return report


if __name__ == "__main__":
    main()
