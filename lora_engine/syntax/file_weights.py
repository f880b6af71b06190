"""``FILE:W[:W]``: a file named with its weights, as the tools take it (merge, bake, the web UI's lines)."""
from __future__ import annotations

import os

from ..errors import ToolError


def split_weights(spec: str, most: int) -> tuple[str, list[float]]:
    """``"path:0.8:-1"`` -> ``("path", [0.8, -1.0])``: up to ``most`` trailing numbers (a Windows drive
    letter or a path with ':' is left alone because it does not parse as a number). A part after an
    existing file that is not a number is an error naming it (``a.safetensors:abc``), not a missing file."""
    path, numbers = spec, []
    while len(numbers) < most and ":" in path:
        head, tail = path.rsplit(":", 1)
        try:
            numbers.insert(0, float(tail))
        except ValueError:
            break
        path = head
    if not os.path.exists(path):
        parts = path.split(":")
        for i in range(len(parts) - 1, 0, -1):
            file = ":".join(parts[:i])
            if os.path.isfile(file):
                bad = next((x for x in parts[i:] if not _is_number(x)), ":".join(parts[i:]))
                raise ToolError(f"{spec}: weight {bad!r} is not a number (FILE:WEIGHT, e.g. {file}:0.8)")
    return path, numbers


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
