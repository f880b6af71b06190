"""A training-loss chart drawn with PIL (the same picture in every gradio version, no plotting
library): raw loss as light dots, an exponential moving average (``m ← β·m + (1−β)·x``,
bias-corrected ``m / (1 − βᵗ)``) as a line, axes with the step and loss ranges."""
from __future__ import annotations

import math


def smoothed(values: list[float], beta: float = 0.9) -> list[float]:
    out, m = [], 0.0
    for t, x in enumerate(values, 1):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta ** t))
    return out


def loss_plot(losses, width: int = 480, height: int = 240, title: str = "training loss"):
    """PIL image of ``losses`` (finite values only; an empty chart says "no steps yet")."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 10, 24, height - 28
    draw.text((left, 6), title, fill=(0, 0, 0))
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    vals = [float(v) for v in losses if v is not None and math.isfinite(float(v))]
    if not vals:
        draw.text((left + 10, (top + bottom) // 2), "no steps yet", fill=(120, 120, 120))
        return img
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(vals)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(n - 1, 1))
        return x, bottom - (bottom - top) * (v - lo) / (hi - lo)
    for i, v in enumerate(vals):
        x, y = xy(i, v)
        draw.point((x, y), fill=(150, 180, 230))
    line = [xy(i, v) for i, v in enumerate(smoothed(vals))]
    if len(line) > 1:
        draw.line(line, fill=(200, 40, 40), width=2)
    draw.text((4, top - 4), f"{hi:.4g}", fill=(0, 0, 0))
    draw.text((4, bottom - 8), f"{lo:.4g}", fill=(0, 0, 0))
    draw.text((left, bottom + 6), "step 1", fill=(0, 0, 0))
    draw.text((right - 70, bottom + 6), f"step {n}", fill=(0, 0, 0))
    return img
