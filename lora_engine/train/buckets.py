"""Aspect-ratio buckets (sd-scripts' ``library/model_util.py`` ``make_bucket_resolutions``).

For a target area A = R² and step s: for every width w = min, min+s, …, max the bucket
``(w, h)`` with ``h = min(max, ⌊A / w / s⌋ · s)`` (kept when h ≥ min), both orientations, plus
(R, R). An image of aspect a = w/h goes to the bucket whose aspect is nearest in log scale,
is resized by ``k = max(bw / w, bh / h)`` (so it covers the bucket) and centre-cropped.
"""
from __future__ import annotations

import math

import torch
from PIL import Image


def make_buckets(resolution: int, step: int, min_size: int, max_size: int) -> list[tuple[int, int]]:
    area = resolution * resolution
    out = {(resolution, resolution)}
    for w in range(min_size, max_size + 1, step):
        h = min(max_size, (area // w) // step * step)
        if h >= min_size:
            out.add((w, h))
            out.add((h, w))
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def upscale_needed(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """The resize factor ``k``; above 1 means the image is smaller than its bucket."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def load_pixels(path: str, bucket: tuple[int, int]) -> torch.Tensor:
    """Image → (3, bh, bw) float tensor in [−1, 1]: resize to cover, centre crop."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        k = upscale_needed(im.size, bucket)
        new = (max(bucket[0], round(im.size[0] * k)), max(bucket[1], round(im.size[1] * k)))
        if new != im.size:
            im = im.resize(new, Image.Resampling.LANCZOS)
        left, top = (new[0] - bucket[0]) // 2, (new[1] - bucket[1]) // 2
        im = im.crop((left, top, left + bucket[0], top + bucket[1]))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    pixels = data.reshape(bucket[1], bucket[0], 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0
