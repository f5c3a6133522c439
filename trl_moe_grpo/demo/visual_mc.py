"""A multi-task visual multiple-choice dataset rendered with PIL, and its accuracy reward.

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

Rows are in TRL's conversational vision-language format: a `prompt` with one image placeholder per image (a video is
given as its frames, one image part each, the way InternVL's chat feeds videos), the `images` list, the `answer` letter
and the `task` name.
"""

from __future__ import annotations

import functools
import random
import re

from PIL import Image, ImageDraw

SINGLE_IMAGE_TASKS = ("colour", "shape", "count", "position")
TASKS = (*SINGLE_IMAGE_TASKS, "motion", "find")
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
QUESTIONS = {
    "colour": "Colour?",
    "shape": "Shape?",
    "count": "How many?",
    "position": "Where?",
    "motion": "Moves?",
    "find": "Circle?",
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        third_w, third_h = (x1 - x0) // 3, (y1 - y0) // 3
        draw.rectangle((x0 + third_w, y0, x1 - third_w, y1), fill=fill)
        draw.rectangle((x0, y0 + third_h, x1, y1 - third_h), fill=fill)


def _render(task: str, value, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    s = IMAGE_SIZE
    if task in ("colour", "shape"):
        if task == "colour":
            # A small shape in a jittered shade: colour is the easiest property to read, so it gets the least pixels.
            colour = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[value])
            shape, size = rng.choice(SHAPES), rng.randint(s // 5, 2 * s // 5)
        else:
            colour, shape, size = COLOURS[rng.choice(list(COLOURS))], value, rng.randint(s // 2, 4 * s // 5)
        x, y = rng.randint(2, s - size - 2), rng.randint(2, s - size - 2)
        _draw_shape(draw, shape, (x, y, x + size, y + size), colour)
    elif task == "count":
        cells = rng.sample(range(4), value)  # one square per quadrant, so they never overlap
        for cell in cells:
            cx, cy = (cell % 2) * s // 2, (cell // 2) * s // 2
            size = rng.randint(s // 6, s // 4)
            x, y = cx + rng.randint(2, s // 2 - size - 2), cy + rng.randint(2, s // 2 - size - 2)
            draw.rectangle((x, y, x + size, y + size), fill=INK)
    elif task == "position":
        # A small dot anywhere in the triangle between the image's centre and the named side (clear of the diagonals),
        # so the answer is a diagonal boundary, not a fixed spot.
        r = s // 10
        depth = rng.randint(2 * r, s // 2 - r - 2)  # from the centre towards the side; the dot never covers it
        offset = rng.randint(-(depth - DOT_MARGIN), depth - DOT_MARGIN)  # along the side, inside the triangle
        dx, dy = {
            "top": (offset, -depth),
            "bottom": (offset, depth),
            "left": (-depth, offset),
            "right": (depth, offset),
        }[value]
        cx, cy = s // 2 + dx, s // 2 + dy
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=INK)
    return image


def _render_motion(direction: str, rng: random.Random) -> list[Image.Image]:
    """`NUM_FRAMES` frames of a dot moving `MOTION_STEP` pixels per frame towards `direction`."""
    s, r = IMAGE_SIZE, IMAGE_SIZE // 10
    travel = MOTION_STEP * (NUM_FRAMES - 1)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    # Start where the whole path stays inside the frame; the other coordinate is free.
    low, high = r + 2, s - r - 3

    def start(step: int) -> int:
        return rng.randint(low + travel * (step < 0), high - travel * (step > 0))

    x, y = start(dx), start(dy)
    frames = []
    for t in range(NUM_FRAMES):
        frame = Image.new("RGB", (s, s), BACKGROUND)
        cx, cy = x + dx * MOTION_STEP * t, y + dy * MOTION_STEP * t
        ImageDraw.Draw(frame).ellipse((cx - r, cy - r, cx + r, cy + r), fill=INK)
        frames.append(frame)
    return frames


def _render_find(circle_index: int, rng: random.Random) -> list[Image.Image]:
    """`NUM_FIND_IMAGES` images, each one shape in a random colour; only the one at `circle_index` is a circle."""
    others = [shape for shape in SHAPES if shape != "circle"]
    images = []
    for i in range(NUM_FIND_IMAGES):
        shape = "circle" if i == circle_index else rng.choice(others)
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
        size = rng.randint(IMAGE_SIZE // 2, 4 * IMAGE_SIZE // 5)
        x, y = rng.randint(2, IMAGE_SIZE - size - 2), rng.randint(2, IMAGE_SIZE - size - 2)
        _draw_shape(ImageDraw.Draw(image), shape, (x, y, x + size, y + size), COLOURS[rng.choice(list(COLOURS))])
        images.append(image)
    return images


def _choices(task: str) -> list:
    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "count": [1, 2, 3, 4],
        "position": list(POSITIONS),
        "motion": list(DIRECTIONS),
        "find": [1, 2, 3, 4],
    }[task]


def make_example(task: str, index: int, seed: int) -> dict:
    """One example of `task`; `index` fixes the answer letter (cycling A-D) so letters stay balanced."""
    rng = random.Random(f"{seed}:{task}:{index}")
    # Options keep one order per task: a tiny model can then learn to read the image in minutes; the image,
    # not the option list, is what varies.
    options = _choices(task)
    answer_letter = LETTERS[index % 4]
    value = options[LETTERS.index(answer_letter)]
    if task == "motion":
        images = _render_motion(value, rng)
    elif task == "find":
        images = _render_find(value - 1, rng)
    else:
        images = [_render(task, value, rng)]
    text = " ".join([QUESTIONS[task]] + [f"{letter} {option}" for letter, option in zip(LETTERS, options)])
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = [{"role": "user", "content": content}]
    return {"prompt": prompt, "images": images, "answer": answer_letter, "task": task}


def visual_mc_rows(num_examples: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """`num_examples` rows cycling through `tasks`, deterministic by `seed`."""
    return [make_example(tasks[i % len(tasks)], i // len(tasks), seed) for i in range(num_examples)]


@functools.lru_cache(maxsize=4)  # a recipe asks for its train and its test split: render them once
def visual_mc_dataset(num_train: int = 512, num_test: int = 128, seed: int = 0, tasks: tuple[str, ...] = TASKS):
    """A `DatasetDict` with `train` and `test` splits drawn with different seeds."""
    from datasets import Dataset, DatasetDict

    return DatasetDict(
        train=Dataset.from_list(visual_mc_rows(num_train, seed, tasks)),
        test=Dataset.from_list(visual_mc_rows(num_test, seed + 10_000, tasks)),
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


def accuracy_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion commits to the answer letter, else 0.0 (conversational or plain completions)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if parse_choice(text) == target else 0.0 for text, target in zip(texts, answer)]


def main(argv: list[str] | None = None) -> None:
    """Write the data set to a folder (`save_to_disk`), which a recipe then names as its `dataset_name`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m trl_moe_grpo.demo.visual_mc",
        description="Generate the visual multiple-choice data set (train and test splits) into a folder.",
    )
    parser.add_argument("output_dir", help="Folder to write (datasets' save_to_disk layout).")
    parser.add_argument("--num_train", type=int, default=2048, help="Rows of the train split (default 2048).")
    parser.add_argument("--num_test", type=int, default=512, help="Rows of the test split (default 512).")
    parser.add_argument("--seed", type=int, default=0, help="Seed; the test split uses seed + 10000 (default 0).")
    args = parser.parse_args(argv)
    visual_mc_dataset(args.num_train, args.num_test, args.seed).save_to_disk(args.output_dir)
    print(f"Wrote {args.num_train} train and {args.num_test} test rows to {args.output_dir}.")


if __name__ == "__main__":
    main()
