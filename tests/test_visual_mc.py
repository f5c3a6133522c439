"""The generated visual multiple-choice tasks, their accuracy reward and the bundled tiny MoE model trained on them."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_moe_grpo.demo.visual_mc import (
    ALL_TASKS,
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    HELDOUT_TASKS,
    IMAGE_SIZE,
    INK_TASKS,
    LETTERS,
    NUM_FIND_IMAGES,
    NUM_FRAMES,
    REASONING_FORMAT,
    SHIFTS,
    SPLITS,
    TASKS,
    TRAIN_STYLE,
    accuracy_reward,
    parse_choice,
    parse_reasoning,
    reasoning_solution,
    row_fingerprint,
    shifted_style,
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


# ---------------------------------------------------------------------------------------------- evaluation splits


def fingerprints(rows: list[dict]) -> set[str]:
    return {row_fingerprint(row) for row in rows}


def test_test_rows_that_repeat_a_training_row_are_replaced():
    """`position` has few distinct renderings, so independent seeds repeat rows; `exclude` replaces exactly those."""
    train = visual_mc_rows(400, seed=0, tasks=("position",))
    raw = visual_mc_rows(120, seed=10_000, tasks=("position",))
    repeated = [i for i, row in enumerate(raw) if row_fingerprint(row) in fingerprints(train)]
    assert repeated, "no repeated row drawn: the test would not test anything"
    test = visual_mc_rows(120, seed=10_000, tasks=("position",), exclude=frozenset(fingerprints(train)))
    assert not fingerprints(test) & fingerprints(train)
    assert len(test) == 120
    assert all(row_fingerprint(test[i]) != row_fingerprint(raw[i]) for i in repeated)
    assert [row["answer"] for row in test] == [row["answer"] for row in raw]  # same letter, so still balanced
    kept = [i for i in range(len(raw)) if i not in repeated]
    assert same_rows([raw[i] for i in kept], [test[i] for i in kept])


def test_every_evaluation_split_is_disjoint_from_training_and_deterministic():
    data = visual_mc_dataset(96, 48, seed=1)
    assert list(data) == list(SPLITS)
    assert all(len(data[name]) == 48 for name in SPLITS[1:])
    rows = {name: [data[name][i] for i in range(len(data[name]))] for name in SPLITS}
    train = fingerprints(rows["train"])
    for name in SPLITS[1:]:
        assert not fingerprints(rows[name]) & train, name
    assert {row["task"] for row in rows["test"]} == {row["task"] for row in rows["test_shifted"]} == set(TASKS)
    assert {row["task"] for row in rows["test_heldout_tasks"]} == set(HELDOUT_TASKS)
    # Deterministic by seed: drawn again (not from the cache), the splits are the same rows.
    exclude = frozenset(train)
    again = visual_mc_rows(48, seed=10_001, shifted=True, exclude=exclude)
    assert [row_fingerprint(row) for row in rows["test_shifted"]] == [row_fingerprint(row) for row in again]
    assert [row["shift"] for row in rows["test_shifted"]] == [row["shift"] for row in again]
    again = visual_mc_rows(48, seed=40_001, tasks=HELDOUT_TASKS)
    assert [row_fingerprint(row) for row in rows["test_heldout_tasks"]] == [row_fingerprint(row) for row in again]
    # Read back from the Dataset, a training row has the fingerprint it was generated with.
    assert train == fingerprints(visual_mc_rows(96, seed=1))
    # Without `disjoint`, `test` is the raw draw (the split written before; `--keep_duplicates`).
    raw = visual_mc_dataset(96, 48, seed=1, disjoint=False)["test"]
    assert [row_fingerprint(row) for row in raw] == [row_fingerprint(row) for row in visual_mc_rows(48, seed=10_001)]


def test_shifted_rows_are_the_test_rows_in_styles_training_never_uses():
    test = visual_mc_rows(120, seed=10_000)
    shifted = visual_mc_rows(120, seed=10_000, shifted=True)
    for i, (plain, row) in enumerate(zip(test, shifted, strict=True)):
        assert (row["prompt"], row["answer"], row["task"]) == (plain["prompt"], plain["answer"], plain["task"])
        assert len(row["images"]) == len(plain["images"])
        assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(row["images"], plain["images"]))
        names = row["shift"].split("+")
        style = shifted_style(10_000, row["task"], i // len(TASKS))  # draw i // 6 of its task: no exclusions here
        assert names == list(style.shifts)
        corner = np.asarray(row["images"][0])[0, 0]
        if "noise" not in names:  # the corner pixel is background
            expected = style.background if "background" in names else BACKGROUND
            assert tuple(corner) == expected, (names, corner)
        else:  # noise: the background is no longer one colour
            assert np.asarray(row["images"][0])[:8, :8].reshape(-1, 3).std(0).min() > 5
    # Every shift field is drawn, and none of its values is the training one.
    drawn = {name for row in shifted for name in row["shift"].split("+")}
    assert drawn == set(SHIFTS)
    for name, values in SHIFTS.items():
        assert getattr(TRAIN_STYLE, name) not in values, name


@given(st.integers(0, 10**6), st.sampled_from(ALL_TASKS), st.integers(0, 10**4))
@settings(max_examples=200, deadline=None)
def test_shifted_style_changes_at_least_one_field_to_an_untrained_value(seed, task, index):
    style = shifted_style(seed, task, index)
    assert style.shifts and style == shifted_style(seed, task, index)
    for name in style.shifts:
        assert getattr(style, name) in SHIFTS[name]
    assert task in INK_TASKS or "ink" not in style.shifts  # every shifted field shows in the task's images


def test_heldout_tasks_are_compositions_never_in_training():
    train = visual_mc_rows(len(TASKS) * 40, seed=0)
    seen = {(len(row["images"]), row["prompt"][0]["content"][-1]["text"], row["task"]) for row in train}
    heldout = visual_mc_rows(48, seed=40_000, tasks=HELDOUT_TASKS)
    assert not set(HELDOUT_TASKS) & set(TASKS)
    for task in HELDOUT_TASKS:
        rows = [row for row in heldout if row["task"] == task]
        assert Counter(row["answer"] for row in rows) == {letter: 4 for letter in LETTERS}, task
    for row in heldout:
        text = row["prompt"][0]["content"][-1]["text"]
        # Never the same question on the same number of images as a training task.
        assert not any(n == len(row["images"]) and t == text for n, t, _ in seen), row["task"]
        pixels = [np.asarray(image).astype(int) for image in row["images"]]
        if row["task"] == "video_colour":  # four frames, a dot in the answer's colour
            colour = np.array(COLOURS[list(COLOURS)[LETTERS.index(row["answer"])]])
            assert len(pixels) == NUM_FRAMES
            assert all((np.abs(p - colour).sum(-1) == 0).sum() > 20 for p in pixels)
        elif row["task"] == "find_square":  # exactly one image whose shape fills its bounding box
            fills = []
            for p in pixels:
                ys, xs = (p != BACKGROUND).any(-1).nonzero()
                fills.append(len(ys) / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1)))
            assert [i for i, fill in enumerate(fills) if fill > 0.97] == [LETTERS.index(row["answer"])], fills


# ---------------------------------------------------------------------------------------------- reasoning task

OBJECTS = st.lists(st.tuples(st.sampled_from(("red", "blue")), st.sampled_from(("circle", "square"))), min_size=1)


@given(OBJECTS.filter(lambda o: len(o) <= 4), st.integers(1, 4), st.sampled_from(LETTERS), st.sampled_from(" \n"))
def test_parse_reasoning_reads_the_final_letter_of_the_whole_format(objects, count, letter, space):
    text = reasoning_solution([f"{c} {s}" for c, s in objects], count, letter)
    assert parse_reasoning(text) == letter == parse_reasoning(space + text + space)
    for broken in (
        text.replace(" so ", " "),  # no "so"
        text.replace(" = ", " "),  # no count
        text + " B",  # something after the letter
        "so " + text,  # something before the working
        text.replace(", ", " ", 1) if len(objects) > 1 else text.replace("red", "pink").replace("blue", "pink"),
        text[:-1],  # cut before the letter (max_completion_length)
        letter,  # the answer alone: no working
    ):
        assert parse_reasoning(broken) is None, broken


def test_accuracy_reward_scores_reasoning_rows_on_their_final_letter_only():
    texts = ["red circle = 1 so A", "red circle = 3 so A", "blue circle, red square = 1 so B", "A", "so A"]
    # The second and third name a wrong count: only the letter is scored. A bare letter has no reasoning format.
    assert accuracy_reward(texts, answer=["A", "A", "A", "A", "A"], task=["tally"] * 5) == [1, 1, 0, 0, 0]
    # The same texts as one-letter answers of another task: read by `parse_choice`.
    assert accuracy_reward(texts, answer=["A"] * 5, task=["colour"] * 5) == [1, 1, 0, 1, 1]


def test_tally_rows_name_what_the_image_shows():
    rows = visual_mc_rows(40, seed=7, tasks=("tally", "colour"))
    assert all("solution" in row for row in rows)  # a reasoning task in the mix: every row has one
    for row in rows:
        if row["task"] != "tally":
            assert row["solution"] == row["answer"]
            continue
        working, count, letter = REASONING_FORMAT.fullmatch(row["solution"]).group("working", "count", "letter")
        assert letter == row["answer"] == LETTERS[int(count) - 1]
        named = [name.split()[0] for name in working.split(", ")]
        assert named.count("red") == int(count)
        pixels = np.asarray(row["images"][0]).astype(int)
        half = IMAGE_SIZE // 2
        shown = []
        for cell in range(4):  # reading order
            quadrant = pixels[(cell // 2) * half : (cell // 2 + 1) * half, (cell % 2) * half : (cell % 2 + 1) * half]
            for name in ("red", "blue"):
                if (np.abs(quadrant - np.array(COLOURS[name])).sum(-1) == 0).sum() > 20:
                    shown.append(name)
        assert shown == named, (shown, row["solution"])


def test_bundled_reasoning_model_writes_the_working_then_the_answer():
    """`bundled/tiny-internvl-moe-reason` had `tally` in its fine-tuning: its greedy completions have the format."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from trl_moe_grpo.data_utils import calibration_batches

    folder = BUNDLED.parent / "tiny-internvl-moe-reason"
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < 4 * 2**20  # as small as the quickstart's
    rows = visual_mc_rows(16, seed=10_000, tasks=("tally", "colour"))
    processor.tokenizer.padding_side = "left"
    (inputs,) = calibration_batches(processor, rows, len(rows))
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=64, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
    texts = processor.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    tally = [text for text, row in zip(texts, rows) if row["task"] == "tally"]
    # The build measured 0.94 of held-out tally completions in the format (128 rows); one-letter tasks stay one letter.
    assert sum(parse_reasoning(text) is not None for text in tally) >= 6, tally
    assert all(len(text.split(",")) <= 4 for text in tally)  # at most one object per quadrant
    assert all(len(text.strip()) == 1 for text, row in zip(texts, rows) if row["task"] == "colour"), texts
    rewards = accuracy_reward(texts, answer=[row["answer"] for row in rows], task=[row["task"] for row in rows])
    assert sum(rewards) / len(rewards) > 0.4, list(zip(texts, rewards))  # chance is 0.25
