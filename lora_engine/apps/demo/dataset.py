"""Synthetic captioned images: plain coloured shapes on a plain background, made with PIL.

Every image is a function of ``(colour, shape, centre, size)`` drawn at ``SUPERSAMPLE`` times the
resolution and box-filtered down (anti-aliased edges); the parameters come from a seeded
``numpy.random.Generator``, so ``make_dataset(n, seed=s)`` gives the same tensors on every machine.

Captions are ``"a {colour} {shape}"``. The demo base model is trained on ``BASE_COLOURS``; the
demo LoRA teaches a colour the base never saw (``CONCEPT_COLOUR``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# sRGB in [0, 1].
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.88, 0.12, 0.10),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.55, 0.10, 0.75),
}
BASE_COLOURS = ("red", "green", "blue", "yellow")
CONCEPT_COLOUR = "purple"
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (0.93, 0.93, 0.90)
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One picture: a ``colour`` ``shape`` of half-size ``size`` at ``(cx, cy)``, as fractions of the side."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"


def render(spec: ShapeSpec, resolution: int = 32) -> np.ndarray:
    """``(H, W, 3)`` float32 image in [0, 1]."""
    from PIL import Image, ImageDraw

    side = resolution * SUPERSAMPLE
    bg = tuple(round(255 * c) for c in BACKGROUND)
    fg = tuple(round(255 * c) for c in COLOURS[spec.colour])
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    cx, cy, r = spec.cx * side, spec.cy * side, spec.size * side
    if spec.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif spec.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif spec.shape == "triangle":
        draw.polygon(((cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)), fill=fg)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def random_specs(n: int, colours=BASE_COLOURS, shapes=SHAPES, seed: int = 0) -> list[ShapeSpec]:
    """``n`` pictures with colour and shape cycling evenly (a balanced set) and seeded placement."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        size = float(rng.uniform(0.2, 0.34))
        cx, cy = (float(v) for v in rng.uniform(size + 0.02, 0.98 - size, size=2))
        specs.append(ShapeSpec(colours[i % len(colours)], shapes[(i // len(colours)) % len(shapes)], cx, cy, size))
    return specs


def make_dataset(n: int, colours=BASE_COLOURS, shapes=SHAPES, seed: int = 0,
                 resolution: int = 32) -> tuple[torch.Tensor, list[str]]:
    """``(images (n, 3, H, W) in [-1, 1], captions)``."""
    specs = random_specs(n, colours, shapes, seed)
    arr = np.stack([render(s, resolution) for s in specs])
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous() * 2 - 1
    return images, [s.caption for s in specs]
