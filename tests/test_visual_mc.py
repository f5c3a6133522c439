"""The generated visual multiple-choice tasks, their accuracy reward and the bundled tiny MoE model trained on them."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trl_moe_grpo.demo.visual_mc import (
    BACKGROUND,
    DIRECTIONS,
    IMAGE_SIZE,
    LETTERS,
    NUM_FIND_IMAGES,
    NUM_FRAMES,
    TASKS,
    accuracy_reward,
    parse_choice,
    visual_mc_dataset,
    visual_mc_rows,
)

BUNDLED = Path(__file__).resolve().parents[1] / "bundled" / "tiny-internvl-moe"


@pytest.fixture(scope="module")
def rows():
    return visual_mc_rows(64, seed=3)


def same_rows(a: list[dict], b: list[dict]) -> bool:
    return all(
        x["prompt"] == y["prompt"]
        and x["answer"] == y["answer"]
        and x["task"] == y["task"]
        and len(x["images"]) == len(y["images"])
        and all(np.array_equal(np.asarray(i), np.asarray(j)) for i, j in zip(x["images"], y["images"]))
        for x, y in zip(a, b, strict=True)
    )


def test_deterministic_by_seed(rows):
    assert same_rows(rows, visual_mc_rows(64, seed=3))
    other = visual_mc_rows(64, seed=4)
    assert not all(np.array_equal(np.asarray(x["images"][0]), np.asarray(y["images"][0])) for x, y in zip(rows, other))
    # A longer split starts with the shorter one, so test sets of different sizes nest.
    assert same_rows(rows[:32], visual_mc_rows(32, seed=3))


def test_every_task_with_balanced_answers():
    rows = visual_mc_rows(96, seed=3)
    assert Counter(row["task"] for row in rows) == {task: 16 for task in TASKS}
    for task in TASKS:
        letters = Counter(row["answer"] for row in rows if row["task"] == task)
        assert letters == {letter: 4 for letter in LETTERS}, task
    # Only the tasks asked for, still balanced.
    colour = visual_mc_rows(8, seed=0, tasks=("colour",))
    assert {row["task"] for row in colour} == {"colour"}
    assert Counter(row["answer"] for row in colour) == {letter: 2 for letter in LETTERS}


def test_conversational_format_with_one_image_part_per_image(rows):
    from trl.data_utils import is_conversational

    for row in rows:
        assert is_conversational(row)
        (message,) = row["prompt"]
        assert message["role"] == "user"
        expected = {"motion": NUM_FRAMES, "find": NUM_FIND_IMAGES}.get(row["task"], 1)
        assert [part["type"] for part in message["content"]] == ["image"] * expected + ["text"]
        text = message["content"][-1]["text"]
        assert all(f"{letter} " in text for letter in LETTERS)
        assert len(row["images"]) == expected
        for image in row["images"]:
            assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE) == (56, 56)
    # The same rows as a datasets.DatasetDict: train and test differ.
    data = visual_mc_dataset(8, 4, seed=0)
    assert (len(data["train"]), len(data["test"])) == (8, 4)
    assert data["train"][0]["images"][0].size == (56, 56)


def test_motion_frames_move_the_dot_in_the_answer_direction():
    """The dot's centre of mass moves monotonically in the answer's direction across the frames."""
    for row in visual_mc_rows(24, seed=5, tasks=("motion",)):
        direction = DIRECTIONS[LETTERS.index(row["answer"])]
        centres = []
        for frame in row["images"]:
            ink = np.asarray(frame).sum(-1) < 200
            ys, xs = ink.nonzero()
            centres.append((xs.mean(), ys.mean()))
        axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[direction]
        steps = [sign * (b[axis] - a[axis]) for a, b in zip(centres, centres[1:])]
        assert all(step > 4 for step in steps), (direction, centres)


def test_find_has_exactly_one_circle_at_the_answer():
    """A circle fills about pi/4 of its bounding box; squares fill all of it, triangles and crosses 1/2 and 5/9."""
    for row in visual_mc_rows(24, seed=5, tasks=("find",)):
        fills = []
        for image in row["images"]:
            ink = (np.asarray(image) != BACKGROUND).any(-1)
            ys, xs = ink.nonzero()
            fills.append(ink.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1)))
        circles = [i for i, fill in enumerate(fills) if abs(fill - np.pi / 4) < 0.06]
        assert circles == [LETTERS.index(row["answer"])], fills


@pytest.mark.parametrize(
    "text, letter",
    [
        ("The answer is (B).", "B"),
        ("b", "B"),
        ("B and C", None),
        ("a", "A"),
        ("a cat", None),
        ("(c)", "C"),
        ("D.", "D"),
        (" A ", "A"),
        ("", None),
        ("E", None),
    ],
)
def test_parse_choice(text, letter):
    assert parse_choice(text) == letter


def test_accuracy_reward_plain_and_conversational():
    texts = ["The answer is (B).", "b", "B and C", "a cat", "(c)", "D."]
    answers = ["B", "B", "B", "A", "C", "A"]
    expected = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert accuracy_reward(texts, answer=answers) == expected
    conversational = [[{"role": "assistant", "content": text}] for text in texts]
    assert accuracy_reward(conversational, answer=answers, task=["colour"] * len(texts)) == expected


def test_bundled_model_loads_is_moe_and_beats_chance():
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from trl_moe_grpo.analysis.accuracy import evaluate_accuracy
    from trl_moe_grpo.routing import RoutingController

    model = AutoModelForImageTextToText.from_pretrained(BUNDLED, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(BUNDLED)
    image_token_id = processor.tokenizer.context_image_token_id
    assert model.config.image_token_id == image_token_id
    assert processor.image_seq_length == model.config.image_seq_length
    controller = RoutingController(model, vision_token_ids=[image_token_id])
    assert (controller.num_layers, controller.num_experts, controller.top_k) == (2, 8, 2)
    controller.remove()
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < 4 * 2**20  # a few MB

    # The quickstart's held-out split (`visual_mc_dataset(seed=0)["test"]`), greedy, stock top-K routing.
    held_out = visual_mc_rows(64, seed=10_000)
    accuracy = evaluate_accuracy(model, processor, held_out, accuracy_reward, batch_size=32, max_new_tokens=2)
    assert set(accuracy) == {"all", *TASKS}
    assert accuracy["all"] > 0.35, accuracy  # the build measured ~0.55 on 128 rows; chance is 0.25
