"""Generated image-caption and image-classification data for the CLIP-MoE miniature (32x32 RGB, built locally).

A small world of coloured objects in four families, drawn with PIL:

- `shape`: geometric shapes (circle, square, triangle, diamond, cross, ring, hexagon, star) - the source task;
- `digit`: seven-segment digits (zero ... nine);
- `pattern`: textures (stripes, checkerboard, dots, grid...);
- `arrow`: arrows pointing up, down, left or right.

Each object has a colour, a size, a position jitter and a dark background; a `style` renders it differently: `plain`,
`sketch` (dark outline on a light background), `inverted` (colours inverted), `noisy` (Gaussian pixel noise) or
`rotated` (turned by 20-35 degrees).

`caption_pairs` makes the contrastive pre-training pairs (every family and colour, mostly `plain`, some of every other
style, so that a pre-trained CLIP recognizes a shifted image somewhat, as a web-trained CLIP does a sketch).
`classification_dataset` makes the evaluation suites of the miniature of the paper's Tables 2-3: the few-shot source
task (`shapes`, the ImageNet role), cross-dataset targets (`digits`, `patterns`, `arrows`, `colors`: other object
families, and colour instead of shape) and shifted domains of the source (`shapes-sketch`, `shapes-inverted`,
`shapes-noisy`, `shapes-rotated`). Every row set is a `datasets.Dataset` with an `image` column and a `label`
`ClassLabel` column whose names are the class names; each suite also has the class-prompt template its zero-shot
classifier uses (`SUITES[name].template`).

Everything is a pure function of its seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ..errors import MoEGRPOError

IMAGE_SIZE = 32
# Name -> RGB.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hexagon", "star")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PATTERNS = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "dots", "grid")
ARROWS = ("up arrow", "down arrow", "left arrow", "right arrow")
FAMILIES = {"shape": SHAPES, "digit": DIGITS, "pattern": PATTERNS, "arrow": ARROWS}
STYLES = ("plain", "sketch", "inverted", "noisy", "rotated")

# Seven-segment layout: segment -> ((x0, y0), (x1, y1)) in a unit box, and the segments of each digit.
_SEGMENTS = {
    "a": ((0, 0), (1, 0)),
    "b": ((1, 0), (1, 0.5)),
    "c": ((1, 0.5), (1, 1)),
    "d": ((0, 1), (1, 1)),
    "e": ((0, 0.5), (0, 1)),
    "f": ((0, 0), (0, 0.5)),
    "g": ((0, 0.5), (1, 0.5)),
}
_DIGIT_SEGMENTS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")


@dataclass(frozen=True)
class ObjectSpec:
    """One object to draw: family, class (an entry of `FAMILIES[family]`), colour name and style."""

    family: str
    name: str
    color: str
    style: str = "plain"


def _polygon(cx: float, cy: float, radius: float, sides: int, phase: float) -> list[tuple[float, float]]:
    return [
        (
            cx + radius * math.cos(phase + 2 * math.pi * i / sides),
            cy + radius * math.sin(phase + 2 * math.pi * i / sides),
        )
        for i in range(sides)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx, cy, r, fill, outline_only: bool) -> None:
    width = max(2, round(r / 4))
    kwargs = {"outline": fill, "width": width} if outline_only else {"fill": fill}
    box = (cx - r, cy - r, cx + r, cy + r)
    if name == "circle":
        draw.ellipse(box, **kwargs)
    elif name == "square":
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), **kwargs)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, r, 3, -math.pi / 2), **kwargs)
    elif name == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], **kwargs)
    elif name == "cross":
        t = 0.3 * r
        points = [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
            (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
        draw.polygon(points, **kwargs)
    elif name == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(r / 2.5)))
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), **kwargs)
    elif name == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + math.pi * i / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, **kwargs)
    else:
        raise MoEGRPOError(f"Unknown shape {name!r}: use one of {SHAPES}.")


def _draw_digit(draw: ImageDraw.ImageDraw, name: str, cx, cy, r, fill) -> None:
    w, h, width = 0.55 * r, r, max(2, round(r / 3.5))
    for segment in _DIGIT_SEGMENTS[DIGITS.index(name)]:
        (x0, y0), (x1, y1) = _SEGMENTS[segment]
        draw.line((cx - w + 2 * w * x0, cy - h + 2 * h * y0, cx - w + 2 * w * x1, cy - h + 2 * h * y1), fill, width)


def _draw_pattern(draw: ImageDraw.ImageDraw, name: str, fill, period: int, offset: int) -> None:
    size = IMAGE_SIZE
    half = max(1, period // 2)
    if name == "horizontal stripes":
        for y in range(offset % period, size, period):
            draw.rectangle((0, y, size, y + half - 1), fill=fill)
    elif name == "vertical stripes":
        for x in range(offset % period, size, period):
            draw.rectangle((x, 0, x + half - 1, size), fill=fill)
    elif name == "diagonal stripes":
        for k in range(-size + offset % period, 2 * size, period):
            draw.line((k, 0, k + size, size), fill=fill, width=half)
    elif name == "checkerboard":
        for y in range(0, size, half):
            for x in range(0, size, half):
                if ((x + offset) // half + y // half) % 2 == 0:
                    draw.rectangle((x, y, x + half - 1, y + half - 1), fill=fill)
    elif name == "dots":
        for y in range(offset % period, size, period):
            for x in range(offset % period, size, period):
                draw.ellipse((x, y, x + half, y + half), fill=fill)
    elif name == "grid":
        for k in range(offset % period, size, period):
            draw.line((k, 0, k, size), fill=fill, width=1)
            draw.line((0, k, size, k), fill=fill, width=1)
    else:
        raise MoEGRPOError(f"Unknown pattern {name!r}: use one of {PATTERNS}.")


def _draw_arrow(draw: ImageDraw.ImageDraw, name: str, cx, cy, r, fill) -> None:
    # An arrow pointing right, then turned.
    t = 0.22 * r
    points = [(-r, -t), (0.1 * r, -t), (0.1 * r, -0.65 * r), (r, 0), (0.1 * r, 0.65 * r), (0.1 * r, t), (-r, t)]
    turn = {"right arrow": 0.0, "down arrow": math.pi / 2, "left arrow": math.pi, "up arrow": -math.pi / 2}[name]
    c, s = math.cos(turn), math.sin(turn)
    draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in points], fill=fill)


def render(spec: ObjectSpec, rng: random.Random) -> Image.Image:
    """Draw one 32x32 RGB image of `spec`, with size, position and background jitter from `rng`."""
    if spec.family not in FAMILIES or spec.name not in FAMILIES[spec.family]:
        raise MoEGRPOError(f"Unknown object {spec.family}/{spec.name!r}: families and classes are in `FAMILIES`.")
    if spec.style not in STYLES:
        raise MoEGRPOError(f"Unknown style {spec.style!r}: use one of {STYLES}.")
    sketch = spec.style == "sketch"
    shade = rng.randint(0, 40)
    background = (235 - shade,) * 3 if sketch else (shade, shade, shade + rng.randint(0, 15))
    fill = (30, 30, 30) if sketch else COLORS[spec.color]
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(9.0, 13.0)
    cx = IMAGE_SIZE / 2 + rng.uniform(-2.5, 2.5)
    cy = IMAGE_SIZE / 2 + rng.uniform(-2.5, 2.5)
    if spec.family == "shape":
        _draw_shape(draw, spec.name, cx, cy, r, fill, outline_only=sketch)
    elif spec.family == "digit":
        _draw_digit(draw, spec.name, cx, cy, r, fill)
    elif spec.family == "pattern":
        _draw_pattern(draw, spec.name, fill, period=rng.choice((6, 8)), offset=rng.randint(0, 7))
    else:
        _draw_arrow(draw, spec.name, cx, cy, r, fill)
    if spec.style == "inverted":
        image = ImageOps.invert(image)
    elif spec.style == "rotated":
        angle = rng.choice((-1, 1)) * rng.uniform(20.0, 35.0)
        image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=background)
    elif spec.style == "noisy":
        pixels = np.asarray(image, dtype=np.float32)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 45.0, pixels.shape)
        image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    return image


# ---------------------------------------------------------------------------------------------- captions

CAPTION_TEMPLATES = (
    "a photo of a {color} {name}",
    "a photo of a {name}",
    "a {color} {name}",
    "a photo of something {color}",
)
SKETCH_CAPTION = "a sketch of a {name}"
# Shares of the pre-training images in each style (the rest are plain).
PRETRAIN_STYLE_SHARES = {"sketch": 0.08, "inverted": 0.06, "noisy": 0.06, "rotated": 0.06}


def caption(spec: ObjectSpec, rng: random.Random) -> str:
    """A caption of `spec`: colour and class, class only, or colour only (sketches sometimes say so)."""
    if spec.style == "sketch" and rng.random() < 0.5:
        return SKETCH_CAPTION.format(name=spec.name)
    template = rng.choice(CAPTION_TEMPLATES)
    if spec.style == "sketch" and "{color}" in template:
        template = "a photo of a {name}"  # a sketch's ink is not the object's colour
    return template.format(color=spec.color, name=spec.name)


def caption_pairs(count: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """`count` (image, caption) pre-training pairs over every family, colour and (mostly plain) style."""
    rng = random.Random(seed)
    families = list(FAMILIES)
    images, captions = [], []
    for _ in range(count):
        family = rng.choice(families)
        draw_style = rng.random()
        style = "plain"
        for name, share in PRETRAIN_STYLE_SHARES.items():
            if draw_style < share:
                style = name
                break
            draw_style -= share
        spec = ObjectSpec(family, rng.choice(FAMILIES[family]), rng.choice(list(COLORS)), style)
        images.append(render(spec, rng))
        captions.append(caption(spec, rng))
    return images, captions


def vocabulary() -> list[str]:
    """Every word a caption or a class prompt of this world uses (the tiny CLIP's word-level vocabulary)."""
    words = set("a photo of something sketch".split())
    for names in FAMILIES.values():
        for name in names:
            words.update(name.split())
    words.update(COLORS)
    return sorted(words)


# ---------------------------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class Suite:
    """One classification dataset of the miniature.

    Attributes:
        family: the object family drawn.
        classes: the class names (`label` names), in label order.
        template: the class prompt, `{}` the class name.
        label_of: `"name"` (the label is the object's class) or `"color"` (the label is its colour).
        style: how images are drawn.
    """

    family: str
    classes: tuple[str, ...]
    template: str
    label_of: str = "name"
    style: str = "plain"


SOURCE = "shapes"
SUITES: dict[str, Suite] = {
    "shapes": Suite("shape", SHAPES, "a photo of a {}"),
    "digits": Suite("digit", DIGITS, "a photo of a {}"),
    "patterns": Suite("pattern", PATTERNS, "a photo of a {}"),
    "arrows": Suite("arrow", ARROWS, "a photo of a {}"),
    "colors": Suite("shape", tuple(COLORS), "a photo of something {}", label_of="color"),
    **{f"shapes-{style}": Suite("shape", SHAPES, "a photo of a {}", style=style) for style in STYLES[1:]},
}
CROSS_DATASET = ("digits", "patterns", "arrows", "colors")
DOMAINS = ("shapes-sketch", "shapes-inverted", "shapes-noisy", "shapes-rotated")


def classification_dataset(name: str, per_class: int, seed: int):
    """`per_class` images of every class of suite `name`, as a `datasets.Dataset` (`image`, `label` ClassLabel).

    Different seeds give disjoint draws in practice (the jitter is continuous); the miniature trains on the source
    suite with one seed and evaluates every suite with another.
    """
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    if name not in SUITES:
        raise MoEGRPOError(f"Unknown suite {name!r}: use one of {', '.join(SUITES)}.")
    if per_class < 1:
        raise MoEGRPOError(f"per_class={per_class}: draw at least one image per class.")
    suite = SUITES[name]
    rng = random.Random(f"{name}/{seed}")
    images, labels = [], []
    for _ in range(per_class):
        for label, cls in enumerate(suite.classes):
            if suite.label_of == "color":
                spec = ObjectSpec(suite.family, rng.choice(FAMILIES[suite.family]), cls, suite.style)
            else:
                spec = ObjectSpec(suite.family, cls, rng.choice(list(COLORS)), suite.style)
            images.append(render(spec, rng))
            labels.append(label)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(suite.classes))})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)
