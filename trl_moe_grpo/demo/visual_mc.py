"""A multi-task visual multiple-choice dataset rendered with PIL, its evaluation splits and its accuracy reward.

Six task types over small synthetic images, each needing a different visual skill:

- one image: the `colour` of a shape, the `shape` itself, the `count` of squares, the `position` of a dot;
- a short video (`motion`): four frames of a dot moving left, right, up or down; the answer is its direction, which no
  single frame shows;
- several images (`find`): four shapes in random colours, one per image, exactly one of them a circle; the answer is
  which image.

Each question lists four options A-D (in a fixed order per task); the answer letter is balanced across A-D. The
renderings are tuned so that a tiny model learns the single-image tasks at similar speeds: colour is a small shape in a
jittered shade, shape a large one, position a small dot anywhere in the triangle between the centre and its side.
Everything is deterministic by seed, so a train and a test split never depend on anything but their seeds.

Generalization, as the paper measures it (train on some tasks, score other inputs), has three evaluation splits:

- `test`: held-out rows of the training tasks (seed + 10000);
- `test_shifted`: the same draws as `test`, rendered in a `Style` training never uses: other backgrounds, ink colours,
  object sizes, outlined instead of filled shapes, pixel noise (`SHIFTS`; each row takes at least one, and its
  `shift` column names them);
- `test_heldout_tasks`: task compositions never trained on (`HELDOUT_TASKS`, seed + 40000): the `find` layout asked
  for a square, the colour of the moving dot of a video, the count of circles.

Every evaluation row is checked against the training rows (`row_fingerprint`: task, prompt, answer and every pixel):
a drawn row that equals a training row is replaced by a fresh draw of the same task and answer letter.

A reasoning task, `tally` (`REASONING_TASKS`, not in the default mix), asks how many red shapes an image holds; its
reference completion (`solution` column) names every object in reading order before the answer:
`"red square, blue circle, red circle = 2 so B"`. Its reward scores the final letter only, and only when the whole
completion has that format (`parse_reasoning`), so the routing of every generated token can decide it.

Rows are in TRL's conversational vision-language format: a `prompt` with one image placeholder per image (a video is
given as its frames, one image part each, the way InternVL's chat feeds videos), the `images` list, the `answer` letter
and the `task` name.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image, ImageDraw

SINGLE_IMAGE_TASKS = ("colour", "shape", "count", "position")
TASKS = (*SINGLE_IMAGE_TASKS, "motion", "find")
# Compositions of trained skills never trained on: `find`'s four images asked for a square, `colour` read off the
# moving dot of a video, `count` of circles instead of squares.
HELDOUT_TASKS = ("find_square", "video_colour", "count_circles")
REASONING_TASKS = ("tally",)
ALL_TASKS = (*TASKS, *HELDOUT_TASKS, *REASONING_TASKS)
NUM_FRAMES = 4  # the `motion` video
NUM_FIND_IMAGES = 4  # the `find` task's images, one per option
LETTERS = "ABCD"
IMAGE_SIZE = 56
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top", "bottom", "left", "right")
BACKGROUND, INK = (245, 245, 245), (30, 30, 30)
COLOUR_JITTER = 30  # per channel, for the colour task
DOT_MARGIN = 6  # pixels between the position dot's centre and the diagonals / the centre
DIRECTIONS = ("left", "right", "up", "down")
MOTION_STEP = 8  # pixels the dot moves between frames
TALLY_COLOURS = ("red", "blue")
TALLY_SHAPES = ("circle", "square")
QUESTIONS = {
    "colour": "Colour?",
    "shape": "Shape?",
    "count": "How many?",
    "position": "Where?",
    "motion": "Moves?",
    "find": "Circle?",
    "find_square": "Square?",
    "video_colour": "Colour?",
    "count_circles": "How many circles?",
    "tally": "How many red?",
}
# Seeds of the evaluation splits, relative to the training seed (`test_shifted` takes `test`'s draws).
TEST_SEED_OFFSET, HELDOUT_TASKS_SEED_OFFSET = 10_000, 40_000
SPLITS = ("train", "test", "test_shifted", "test_heldout_tasks")


@dataclass(frozen=True)
class Style:
    """How a row's images are drawn. Training and `test` rows use the defaults; `test_shifted` rows change some fields
    to values from `SHIFTS`, which training never draws.

    Parameters:
        background: the images' background colour.
        ink: the colour of the one-colour drawings (the `count` squares, the `position` and `motion` dots); the
            coloured shapes keep their colours, since a colour is an answer.
        size_scale: every object's size (and the dots' radius) is scaled by this, clipped to fit the image.
        outline: shapes and dots drawn as 2-pixel outlines instead of filled.
        noise: amplitude of uniform per-pixel, per-channel noise added to each image (0: none).
    """

    background: tuple[int, int, int] = BACKGROUND
    ink: tuple[int, int, int] = INK
    size_scale: float = 1.0
    outline: bool = False
    noise: int = 0

    @property
    def shifts(self) -> tuple[str, ...]:
        """The fields that differ from the training style."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name) != getattr(TRAIN_STYLE, f.name))


TRAIN_STYLE = Style()
# The values a shifted row draws from, per field. None of them is a training value.
SHIFTS: dict[str, tuple] = {
    "background": ((200, 222, 240), (240, 226, 196), (214, 240, 214)),  # pale blue, beige, pale green
    "ink": ((90, 30, 120), (120, 60, 20), (20, 90, 100)),  # dark purple, brown, teal
    "size_scale": (0.7, 1.25),
    "outline": (True,),
    "noise": (25, 45),
}
OUTLINE_WIDTH = 2
INK_TASKS = ("count", "count_circles", "position", "motion")  # the tasks drawn in `Style.ink`


def shifted_style(seed: int, task: str, index: int) -> Style:
    """The shifted style of one `test_shifted` row: each field of `SHIFTS` that shows in `task`'s images is shifted
    with probability 1/2, at least one; deterministic by (`seed`, `task`, `index`) and independent of the row's
    content draws."""
    rng = random.Random(f"{seed}:{task}:{index}:shift")
    # The ink colours only the one-colour drawings: a shifted ink alone would leave a coloured shape unchanged.
    candidates = [name for name in SHIFTS if name != "ink" or task in INK_TASKS]
    chosen: list[str] = []
    while not chosen:
        chosen = [name for name in candidates if rng.random() < 0.5]
    return Style(**{name: rng.choice(SHIFTS[name]) for name in chosen})


def _scaled(size: int, style: Style, limit: int = IMAGE_SIZE - 6) -> int:
    return size if style.size_scale == 1.0 else max(2, min(limit, round(size * style.size_scale)))


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill, outline: bool = False
) -> None:
    x0, y0, x1, y1 = box
    paint = {"outline": fill, "width": OUTLINE_WIDTH} if outline else {"fill": fill}
    if shape == "circle":
        draw.ellipse(box, **paint)
    elif shape == "square":
        draw.rectangle(box, **paint)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], **paint)
    elif shape == "cross":
        third_w, third_h = (x1 - x0) // 3, (y1 - y0) // 3
        if outline:
            a, b, c, d = x0 + third_w, x1 - third_w, y0 + third_h, y1 - third_h
            corners = [(a, y0), (b, y0), (b, c), (x1, c), (x1, d), (b, d), (b, y1), (a, y1), (a, d), (x0, d)]
            draw.polygon([*corners, (x0, c), (a, c)], **paint)
        else:
            draw.rectangle((x0 + third_w, y0, x1 - third_w, y1), fill=fill)
            draw.rectangle((x0, y0 + third_h, x1, y1 - third_h), fill=fill)


def _dot(draw: ImageDraw.ImageDraw, cx: int, cy: int, r: int, style: Style, fill=None) -> None:
    _draw_shape(draw, "circle", (cx - r, cy - r, cx + r, cy + r), style.ink if fill is None else fill, style.outline)


def _render(task: str, value, rng: random.Random, style: Style = TRAIN_STYLE) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), style.background)
    draw = ImageDraw.Draw(image)
    s = IMAGE_SIZE
    if task in ("colour", "shape"):
        if task == "colour":
            # A small shape in a jittered shade: colour is the easiest property to read, so it gets the least pixels.
            colour = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[value])
            shape, size = rng.choice(SHAPES), rng.randint(_scaled(s // 5, style), _scaled(2 * s // 5, style))
        else:
            colour = COLOURS[rng.choice(list(COLOURS))]
            shape, size = value, rng.randint(_scaled(s // 2, style), _scaled(4 * s // 5, style))
        x, y = rng.randint(2, s - size - 2), rng.randint(2, s - size - 2)
        _draw_shape(draw, shape, (x, y, x + size, y + size), colour, style.outline)
    elif task in ("count", "count_circles"):
        cells = rng.sample(range(4), value)  # one object per quadrant, so they never overlap
        for cell in cells:
            cx, cy = (cell % 2) * s // 2, (cell // 2) * s // 2
            size = rng.randint(_scaled(s // 6, style, s // 2 - 6), _scaled(s // 4, style, s // 2 - 6))
            x, y = cx + rng.randint(2, s // 2 - size - 2), cy + rng.randint(2, s // 2 - size - 2)
            shape = "square" if task == "count" else "circle"
            _draw_shape(draw, shape, (x, y, x + size, y + size), style.ink, style.outline)
    elif task == "position":
        # A small dot anywhere in the triangle between the image's centre and the named side (clear of the diagonals),
        # so the answer is a diagonal boundary, not a fixed spot.
        r = _scaled(s // 10, style)
        depth = rng.randint(2 * r, s // 2 - r - 2)  # from the centre towards the side; the dot never covers it
        offset = rng.randint(-(depth - DOT_MARGIN), depth - DOT_MARGIN)  # along the side, inside the triangle
        dx, dy = {
            "top": (offset, -depth),
            "bottom": (offset, depth),
            "left": (-depth, offset),
            "right": (depth, offset),
        }[value]
        _dot(draw, s // 2 + dx, s // 2 + dy, r, style)
    return image


def _render_motion(direction: str, rng: random.Random, style: Style = TRAIN_STYLE, fill=None) -> list[Image.Image]:
    """`NUM_FRAMES` frames of a dot (in `style.ink`, or `fill`) moving `MOTION_STEP` pixels per frame towards
    `direction`."""
    s, r = IMAGE_SIZE, _scaled(IMAGE_SIZE // 10, style)
    travel = MOTION_STEP * (NUM_FRAMES - 1)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    # Start where the whole path stays inside the frame; the other coordinate is free.
    low, high = r + 2, s - r - 3

    def start(step: int) -> int:
        return rng.randint(low + travel * (step < 0), high - travel * (step > 0))

    x, y = start(dx), start(dy)
    frames = []
    for t in range(NUM_FRAMES):
        frame = Image.new("RGB", (s, s), style.background)
        _dot(ImageDraw.Draw(frame), x + dx * MOTION_STEP * t, y + dy * MOTION_STEP * t, r, style, fill)
        frames.append(frame)
    return frames


def _render_find(
    target_index: int, rng: random.Random, style: Style = TRAIN_STYLE, target: str = "circle"
) -> list[Image.Image]:
    """`NUM_FIND_IMAGES` images, each one shape in a random colour; only the one at `target_index` is a `target`."""
    others = [shape for shape in SHAPES if shape != target]
    images = []
    for i in range(NUM_FIND_IMAGES):
        shape = target if i == target_index else rng.choice(others)
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), style.background)
        size = rng.randint(_scaled(IMAGE_SIZE // 2, style), _scaled(4 * IMAGE_SIZE // 5, style))
        x, y = rng.randint(2, IMAGE_SIZE - size - 2), rng.randint(2, IMAGE_SIZE - size - 2)
        colour = COLOURS[rng.choice(list(COLOURS))]
        _draw_shape(ImageDraw.Draw(image), shape, (x, y, x + size, y + size), colour, style.outline)
        images.append(image)
    return images


def _render_tally(num_red: int, rng: random.Random, style: Style = TRAIN_STYLE) -> tuple[Image.Image, list[str]]:
    """`num_red` red shapes and up to `4 - num_red` blue ones, one per quadrant, and their names in reading order
    (top-left, top-right, bottom-left, bottom-right)."""
    s = IMAGE_SIZE
    num_blue = rng.randint(0, 4 - num_red)
    colours = ["red"] * num_red + ["blue"] * num_blue
    rng.shuffle(colours)
    cells = sorted(rng.sample(range(4), len(colours)))
    image = Image.new("RGB", (s, s), style.background)
    draw = ImageDraw.Draw(image)
    names = []
    for cell, colour in zip(cells, colours):
        shape = rng.choice(TALLY_SHAPES)
        cx, cy = (cell % 2) * s // 2, (cell // 2) * s // 2
        size = rng.randint(_scaled(s // 5, style, s // 2 - 6), _scaled(s // 3, style, s // 2 - 6))
        x, y = cx + rng.randint(2, s // 2 - size - 2), cy + rng.randint(2, s // 2 - size - 2)
        _draw_shape(draw, shape, (x, y, x + size, y + size), COLOURS[colour], style.outline)
        names.append(f"{colour} {shape}")
    return image, names


def _add_noise(image: Image.Image, amplitude: int, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-amplitude, amplitude + 1, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _choices(task: str) -> list:
    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "count": [1, 2, 3, 4],
        "position": list(POSITIONS),
        "motion": list(DIRECTIONS),
        "find": [1, 2, 3, 4],
        "find_square": [1, 2, 3, 4],
        "video_colour": list(COLOURS),
        "count_circles": [1, 2, 3, 4],
        "tally": [1, 2, 3, 4],
    }[task]


def reasoning_solution(names: list[str], count: int, letter: str) -> str:
    """The reference completion of a reasoning row: `"red square, blue circle = 1 so A"`."""
    return f"{', '.join(names)} = {count} so {letter}"


def make_example(task: str, index: int, seed: int, style: Style = TRAIN_STYLE) -> dict:
    """One example of `task`; `index` fixes the answer letter (cycling A-D) so letters stay balanced.

    With a shifted `style` the content (answer, positions, shapes) is drawn exactly as with the training style, so a
    `test_shifted` row is its `test` row in another style; the row gets a `shift` column naming the shifted fields.
    """
    if task not in ALL_TASKS:
        from ..errors import MoEGRPOError

        raise MoEGRPOError(f"Unknown visual_mc task {task!r}; the tasks are {', '.join(ALL_TASKS)}.")
    rng = random.Random(f"{seed}:{task}:{index}")
    # Options keep one order per task: a tiny model can then learn to read the image in minutes; the image,
    # not the option list, is what varies.
    options = _choices(task)
    answer_letter = LETTERS[index % 4]
    value = options[LETTERS.index(answer_letter)]
    extra = {}
    if task == "motion":
        images = _render_motion(value, rng, style)
    elif task == "video_colour":
        images = _render_motion(rng.choice(DIRECTIONS), rng, style, fill=COLOURS[value])
    elif task in ("find", "find_square"):
        images = _render_find(value - 1, rng, style, target="circle" if task == "find" else "square")
    elif task == "tally":
        image, names = _render_tally(value, rng, style)
        images = [image]
        extra["solution"] = reasoning_solution(names, value, answer_letter)
    else:
        images = [_render(task, value, rng, style)]
    if style.noise:
        noise_rng = np.random.default_rng(
            int.from_bytes(hashlib.sha256(f"{seed}:{task}:{index}:noise".encode()).digest()[:8])
        )
        images = [_add_noise(image, style.noise, noise_rng) for image in images]
    if style != TRAIN_STYLE:
        extra["shift"] = "+".join(style.shifts)
    text = " ".join([QUESTIONS[task]] + [f"{letter} {option}" for letter, option in zip(LETTERS, options)])
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = [{"role": "user", "content": content}]
    return {"prompt": prompt, "images": images, "answer": answer_letter, "task": task, **extra}


def row_fingerprint(row: dict) -> str:
    """A digest of what a model sees and must answer: task, the prompt's parts, answer and every image's pixels.

    The same for a row as generated and as read back from a `datasets.Dataset` (which adds `"text": None` to image
    parts).
    """
    parts = [(part["type"], part.get("text")) for message in row["prompt"] for part in message["content"]]
    digest = hashlib.sha1(repr((row["task"], parts, row["answer"])).encode())
    for image in row["images"]:
        digest.update(image.tobytes())
    return digest.hexdigest()


def visual_mc_rows(
    num_examples: int,
    seed: int = 0,
    tasks: tuple[str, ...] = TASKS,
    shifted: bool = False,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> list[dict]:
    """`num_examples` rows cycling through `tasks`, deterministic by `seed`.

    With `shifted`, every row is drawn as without it and rendered in its `shifted_style`. A draw whose unshifted row
    has its `row_fingerprint` in `exclude` (the training rows) is replaced by the next unused draw of the same task
    and answer letter, so a shifted split stays paired with its unshifted one. When `tasks` include a reasoning task,
    every row gets a `solution` column: the reference completion (the answer letter for the one-letter tasks).
    """
    per_task = -(-num_examples // len(tasks))  # draws 0 .. per_task - 1 of each task are the regular ones
    replacements = {task: 0 for task in tasks}
    rows = []
    for i in range(num_examples):
        task, index = tasks[i % len(tasks)], i // len(tasks)
        row = make_example(task, index, seed)
        while exclude and row_fingerprint(row) in exclude:
            # The next spare draw with the same answer letter (index mod 4), past every regular draw.
            index = 4 * (-(-per_task // 4) + replacements[task]) + index % 4
            replacements[task] += 1
            row = make_example(task, index, seed)
        rows.append(make_example(task, index, seed, shifted_style(seed, task, index)) if shifted else row)
    if any(task in REASONING_TASKS for task in tasks):
        rows = [{**row, "solution": row.get("solution", row["answer"])} for row in rows]
    return rows


@functools.lru_cache(maxsize=4)  # a recipe asks for its train and its test split: render them once
def visual_mc_dataset(
    num_train: int = 512,
    num_test: int = 128,
    seed: int = 0,
    tasks: tuple[str, ...] = TASKS,
    heldout_tasks: tuple[str, ...] = HELDOUT_TASKS,
    disjoint: bool = True,
):
    """A `DatasetDict` with the `SPLITS`: `train` (seed), `test` (seed + 10000), `test_shifted` (`test`'s draws in
    shifted styles) and `test_heldout_tasks` (`heldout_tasks`, seed + 40000), `num_test` rows each.

    With `disjoint` (the default) no evaluation row equals a training row: `test` draws that do are replaced (see
    `visual_mc_rows`). Without it `test` is exactly `visual_mc_rows(num_test, seed + 10000, tasks)`, duplicates
    included (at 2048 training rows, 36 of 512 `test` rows, 30 of them `position` rows, repeat a training row).
    """
    from datasets import Dataset, DatasetDict

    train = visual_mc_rows(num_train, seed, tasks)
    exclude = frozenset(row_fingerprint(row) for row in train) if disjoint else frozenset()
    test_seed = seed + TEST_SEED_OFFSET
    heldout = visual_mc_rows(num_test, seed + HELDOUT_TASKS_SEED_OFFSET, heldout_tasks, exclude=exclude)
    return DatasetDict(
        train=Dataset.from_list(train),
        test=Dataset.from_list(visual_mc_rows(num_test, test_seed, tasks, exclude=exclude)),
        test_shifted=Dataset.from_list(visual_mc_rows(num_test, test_seed, tasks, shifted=True, exclude=exclude)),
        test_heldout_tasks=Dataset.from_list(heldout),
    )


_LETTER = re.compile(r"(?<![A-Za-z])([A-Da-d])(?![A-Za-z])")


def parse_choice(text: str) -> str | None:
    """The single option letter `text` commits to, or `None`.

    Accepts `"B"`, `"b"`, `"(B)"`, `"B."`, `"The answer is (B)."`; a text naming two different letters (`"B and C"`)
    commits to none. The article "a" is only read as option A when it is the whole answer.
    """
    stripped = text.strip()
    if len(stripped) == 1:
        return stripped.upper() if stripped.upper() in LETTERS else None
    found = {m.upper() for m in _LETTER.findall(stripped) if m != "a"}
    return found.pop() if len(found) == 1 else None


# A reasoning completion, whole: objects in reading order, their red count, the letter. Nothing before or after.
_OBJECT = rf"(?:{'|'.join(TALLY_COLOURS)}) (?:{'|'.join(TALLY_SHAPES)})"
REASONING_FORMAT = re.compile(rf"(?P<working>{_OBJECT}(?:, {_OBJECT})*) = (?P<count>[1-4]) so (?P<letter>[A-D])")


def parse_reasoning(text: str) -> str | None:
    """The final answer letter of a reasoning completion (`"red square, blue circle = 1 so A"`), or `None` when the
    completion, surrounding whitespace aside, does not have exactly that format (`REASONING_FORMAT`).

    Only the format is checked, not the working: a completion whose listed objects or count are wrong still commits to
    its letter, which the reward alone scores.
    """
    match = REASONING_FORMAT.fullmatch(text.strip())
    return match["letter"] if match else None


def accuracy_reward(completions: list, answer: list[str], task: list[str] | None = None, **kwargs) -> list[float]:
    """1.0 when the completion commits to the answer letter, else 0.0 (conversational or plain completions).

    Rows of a reasoning task (`REASONING_TASKS`, told by the `task` column) must have the reasoning format and are
    scored on its final letter only (`parse_reasoning`); the others on the letter they name (`parse_choice`).
    """
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    tasks = task if task is not None else [None] * len(texts)
    return [
        1.0 if (parse_reasoning(text) if kind in REASONING_TASKS else parse_choice(text)) == target else 0.0
        for text, target, kind in zip(texts, answer, tasks)
    ]


def main(argv: list[str] | None = None) -> None:
    """Write the data set to a folder (`save_to_disk`), which a recipe then names as its `dataset_name`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m trl_moe_grpo.demo.visual_mc",
        description="Generate the visual multiple-choice data set into a folder: the train split and the evaluation "
        "splits test (held-out rows), test_shifted (the test rows in styles never trained on) and test_heldout_tasks "
        "(task compositions never trained on).",
    )
    parser.add_argument("output_dir", help="Folder to write (datasets' save_to_disk layout).")
    parser.add_argument("--num_train", type=int, default=2048, help="Rows of the train split (default 2048).")
    parser.add_argument("--num_test", type=int, default=512, help="Rows of each evaluation split (default 512).")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed; test uses seed + 10000, test_heldout_tasks seed + 40000 (default 0).",
    )
    parser.add_argument(
        "--tasks", nargs="+", default=list(TASKS), choices=ALL_TASKS, help="Tasks of train and test (default: TASKS)."
    )
    parser.add_argument(
        "--heldout_tasks",
        nargs="+",
        default=list(HELDOUT_TASKS),
        choices=ALL_TASKS,
        help="Tasks of test_heldout_tasks (default: HELDOUT_TASKS).",
    )
    parser.add_argument(
        "--keep_duplicates",
        action="store_true",
        help="Keep test rows that repeat a training row (the splits written before they were made disjoint).",
    )
    args = parser.parse_args(argv)
    data = visual_mc_dataset(
        args.num_train,
        args.num_test,
        args.seed,
        tuple(args.tasks),
        tuple(args.heldout_tasks),
        not args.keep_duplicates,
    )
    data.save_to_disk(args.output_dir)
    print(f"Wrote {', '.join(f'{len(rows)} {name}' for name, rows in data.items())} rows to {args.output_dir}.")


if __name__ == "__main__":
    main()
