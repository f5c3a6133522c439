"""Shared fixtures for the trainer tests: a local tokenizer, the copy-digit task and a small config."""

import pytest
import torch

from trl_moe_grpo import MoEGRPOConfig
from trl_moe_grpo.demo.digit_sum import digit_sum_dataset
from trl_moe_grpo.testing import build_char_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def dataset():
    return digit_sum_dataset(64, seed=0)


@pytest.fixture(scope="session")
def visual_mc_folder(tmp_path_factory):
    """The quickstart's data, small (64 train, 16 test rows), written as `python -m trl_moe_grpo.demo.visual_mc`
    writes it: a folder a recipe names as its `dataset_name`."""
    from trl_moe_grpo.demo.visual_mc import main

    folder = tmp_path_factory.mktemp("data") / "visual_mc"
    main([str(folder), "--num_train", "64", "--num_test", "16"])
    return folder


def digit_share(completions, **kwargs):
    """A verifiable reward that differs whenever two completions differ in digits, so groups carry a signal."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def config_values(tmp_path, **overrides) -> dict:
    """Arguments shared by `MoEGRPOConfig` and `trl.GRPOConfig` in the tests: tiny batches, CPU, fp32."""
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        router_aux_loss_coef=0.0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return values


def make_config(tmp_path, **overrides) -> MoEGRPOConfig:
    return MoEGRPOConfig(**config_values(tmp_path, **overrides))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


COLOURS = {"r": (220, 30, 30), "g": (30, 200, 30), "b": (30, 30, 220)}


def colour_rows(n: int) -> list[dict]:
    """A tiny vision task in TRL's conversational format: the colour of a solid 28x28 image (r, g or b)."""
    from PIL import Image

    rows = []
    for i in range(n):
        key = "rgb"[i % 3]
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}]
        rows.append({"prompt": prompt, "image": Image.new("RGB", (28, 28), COLOURS[key]), "answer": key})
    return rows


def first_letter_reward(completions, answer, **kwargs):
    return [1.0 if c[0]["content"][:1] == a else 0.0 for c, a in zip(completions, answer)]


def group_rows(dataset, num_prompts: int, group: int) -> list[dict]:
    """Rows as TRL's sampler hands them to generation: each prompt repeated `group` times in a row."""
    return [dataset[i] for i in range(num_prompts) for _ in range(group)]


def spread_reward(completions, **kwargs):
    """Rewards 0, 1, 0, 1, ... in batch order, whatever the completions say.

    TRL's sampler puts each prompt's G rollouts in consecutive rows, so with G even every group has reward spread and
    every advantage is non-zero. For tests that need a learning signal through `train()`, where advantages cannot be
    fixed by hand: whether a tiny random model's rollouts happen to differ in a content reward depends on the draw.
    """
    return [float(i % 2) for i in range(len(completions))]
