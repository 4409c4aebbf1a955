"""The shapes world: one object on a background, rendered from known attributes.

NumPy + Pillow only, deterministic by seed. This is the ground truth behind the embedded
``shapes`` model, its probe, and the personalization quality benchmark.

    >>> img = render("star", "red", "striped", "grass", seed=0)   # uint8 [32, 32, 3]
    >>> caption(Subject("star", "red", "striped"), "grass")
    'a red striped star on a grass background'
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
PATTERNS = ("solid", "striped", "dotted")
BACKGROUNDS = ("grey", "sand", "sky", "grass", "night")

RGB = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 225, 40),
    "green": (30, 170, 50), "blue": (30, 70, 225), "purple": (140, 40, 190),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
# Background: (top colour, bottom colour); a vertical gradient plus seeded texture noise.
BG_RGB = {
    "grey": ((135, 135, 135), (110, 110, 110)),
    "sand": ((225, 205, 150), (195, 170, 115)),
    "sky": ((110, 170, 240), (180, 215, 250)),
    "grass": ((90, 160, 70), (50, 115, 40)),
    "night": ((10, 10, 40), (35, 30, 75)),
}

# Shape/colour/pattern combinations that never appear in training: the subjects to personalize.
HELD_OUT = (
    ("star", "red", "striped"), ("heart", "blue", "dotted"), ("ring", "green", "solid"),
    ("cross", "yellow", "striped"), ("square", "purple", "dotted"), ("triangle", "orange", "solid"),
    ("diamond", "white", "striped"), ("circle", "black", "dotted"),
)


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str
    pattern: str

    @classmethod
    def parse(cls, text: str) -> "Subject":
        """'red:striped:star' -> Subject('star', 'red', 'striped')."""
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"subject {text!r} is not colour:pattern:shape")
        colour, pattern, shape = parts
        for value, allowed, what in ((colour, COLOURS, "colour"), (pattern, PATTERNS, "pattern"),
                                     (shape, SHAPES, "shape")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r} in subject {text!r}; one of {', '.join(allowed)}")
        return cls(shape, colour, pattern)

    def __str__(self) -> str:
        return f"{self.colour}:{self.pattern}:{self.shape}"

    @property
    def words(self) -> str:
        return f"{self.colour} {self.pattern} {self.shape}"


def is_held_out(shape: str, colour: str, pattern: str) -> bool:
    return (shape, colour, pattern) in HELD_OUT


def _shape_polygon(shape: str, n: int = 64) -> list[np.ndarray]:
    """Outline(s) of a unit shape centred on 0, radius ~1. Returns polygons; for 'ring' [outer, inner]."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    if shape == "circle":
        return [np.stack([np.cos(t), np.sin(t)], 1)]
    if shape == "ring":
        return [np.stack([np.cos(t), np.sin(t)], 1), 0.55 * np.stack([np.cos(t), np.sin(t)], 1)]
    if shape == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.85]
    if shape == "diamond":
        return [np.array([[0, -1.1], [0.65, 0], [0, 1.1], [-0.65, 0]], float)]
    if shape == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return [np.stack([np.cos(a), np.sin(a)], 1) * 1.1 + [0, 0.15]]
    if shape == "star":
        a = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
        return [np.stack([r * np.cos(a), r * np.sin(a)], 1)]
    if shape == "cross":
        w = 0.33
        return [np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                          [-w, w], [-1, w], [-1, -w], [-w, -w]], float)]
    if shape == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [np.stack([x, y], 1) / 16.0]
    raise ValueError(f"unknown shape {shape!r}")


def _background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    top, bottom = (np.array(c, np.float32) for c in BG_RGB[name])
    ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    img = top * (1 - ramp) + bottom * ramp
    img = np.broadcast_to(img, (size, size, 3)).copy()
    img += rng.normal(0, 6, (size, size, 1)).astype(np.float32)
    return img


def _pattern_mask(pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Where the object takes its secondary tone; bool [size, size] at render resolution."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if pattern == "solid":
        return np.zeros((size, size), bool)
    if pattern == "striped":
        angle = rng.uniform(-0.5, 0.5) + np.pi / 4
        u = xx * np.cos(angle) + yy * np.sin(angle)
        period = 0.16
        return ((u + rng.uniform(0, period)) % period) < period / 2
    if pattern == "dotted":
        period = 0.16
        ox, oy = rng.uniform(0, period, 2)
        dx = ((xx + ox) % period) - period / 2
        dy = ((yy + oy) % period) - period / 2
        return dx * dx + dy * dy < (period * 0.3) ** 2
    raise ValueError(f"unknown pattern {pattern!r}")


def _secondary(colour: str) -> np.ndarray:
    """The pattern's second tone: dark for light colours, light for dark ones."""
    c = np.array(RGB[colour], np.float32)
    if c.mean() > 110:
        return c * 0.25
    return c + (255 - c) * 0.8


def render(shape: str, colour: str, pattern: str, background: str, seed: int = 0,
           size: int = 32) -> np.ndarray:
    """Render one object on a background.

    Returns uint8 [size, size, 3]. The seed sets jitter (scale, position, rotation), the pattern
    phase and the background texture; the same arguments always give the same image.
    """
    for value, allowed, what in ((shape, SHAPES, "shape"), (colour, COLOURS, "colour"),
                                 (pattern, PATTERNS, "pattern"), (background, BACKGROUNDS, "background")):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; one of {', '.join(allowed)}")
    rng = np.random.default_rng(seed)
    ss = 4  # supersampling for antialiased edges
    big = size * ss
    scale = rng.uniform(0.28, 0.38) * big
    cx, cy = big / 2 + rng.uniform(-0.1, 0.1, 2) * big
    if shape in ("circle", "ring"):
        rot = 0.0
    else:
        rot = np.deg2rad(rng.uniform(-20, 20))
    R = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])

    mask_img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask_img)
    for k, poly in enumerate(_shape_polygon(shape)):
        pts = (poly @ R.T) * scale + [cx, cy]
        draw.polygon([tuple(p) for p in pts], fill=255 if k == 0 else 0)
    obj = np.asarray(mask_img, np.float32) / 255.0

    sec = _pattern_mask(pattern, big, rng).astype(np.float32)
    base = np.array(RGB[colour], np.float32)
    tone = base[None, None] * (1 - sec[..., None]) + _secondary(colour)[None, None] * sec[..., None]

    bg = np.asarray(Image.fromarray(np.clip(_background(background, size, rng), 0, 255).astype(np.uint8))
                    .resize((big, big), Image.NEAREST), np.float32)
    out = bg * (1 - obj[..., None]) + tone * obj[..., None]
    small = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).resize((size, size), Image.BOX)
    return np.asarray(small)


def caption(subject: Subject, background: str | None = None, rng: np.random.Generator | None = None,
            drop: float = 0.0) -> str:
    """Plain-English caption; with ``rng`` and ``drop`` > 0, attributes are sometimes left out."""
    def keep() -> bool:
        return rng is None or rng.random() >= drop
    words = []
    if keep():
        words.append(subject.colour)
    if keep():
        words.append(subject.pattern)
    words.append(subject.shape if keep() else "shape")
    text = "a " + " ".join(words)
    if background is not None and keep():
        text += f" on a {background} background"
    return text


def sample(rng: np.random.Generator, held_out_ok: bool = False) -> tuple[Subject, str]:
    """Draw a random (subject, background); training draws skip HELD_OUT."""
    while True:
        s = Subject(SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))],
                    PATTERNS[rng.integers(len(PATTERNS))])
        if held_out_ok or not is_held_out(s.shape, s.colour, s.pattern):
            return s, BACKGROUNDS[rng.integers(len(BACKGROUNDS))]


def reference_images(subject: Subject, n: int = 5, seed: int = 0, size: int = 32) -> list[np.ndarray]:
    """n reference photos of one subject on varied backgrounds (the personalization inputs)."""
    return [render(subject.shape, subject.colour, subject.pattern, BACKGROUNDS[i % len(BACKGROUNDS)],
                   seed=seed * 1000 + i, size=size) for i in range(n)]
