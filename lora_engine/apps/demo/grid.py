"""A labelled image grid (rows = prompts, columns = LoRA weights), as A1111's X/Y plot draws it.

Cells are upscaled by an integer factor with nearest-neighbour sampling so every generated pixel
stays visible as a block; labels use PIL's built-in font (no font files needed).
"""
from __future__ import annotations

import torch

PAD = 4


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def to_pil(image: torch.Tensor, scale: int):
    """(3, H, W) in [0, 1] -> PIL image upscaled ``scale`` times."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    im = Image.fromarray(arr)
    return im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)


def make_grid(cells: list[list[torch.Tensor]], row_labels: list[str], col_labels: list[str],
              title: str = "", scale: int = 4):
    """``cells[r][c]`` (3, H, W) in [0, 1] -> one PIL image with a title, column and row labels."""
    from PIL import Image, ImageDraw

    h, w = cells[0][0].shape[1] * scale, cells[0][0].shape[2] * scale
    font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(t, font=font)) for t in row_labels) + 3 * PAD
    head_h = 22 + (22 if title else 0)
    width = label_w + len(col_labels) * (w + PAD) + PAD
    height = head_h + len(row_labels) * (h + PAD) + PAD
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((PAD, PAD), title, fill=(0, 0, 0), font=font)
    for c, text in enumerate(col_labels):
        x = label_w + c * (w + PAD) + (w - int(draw.textlength(text, font=font))) // 2
        draw.text((x, head_h - 20), text, fill=(0, 0, 0), font=font)
    for r, text in enumerate(row_labels):
        y = head_h + r * (h + PAD)
        draw.text((PAD, y + h // 2 - 8), text, fill=(0, 0, 0), font=font)
        for c, cell in enumerate(cells[r]):
            grid.paste(to_pil(cell, scale), (label_w + c * (w + PAD), y))
    return grid
