"""``FILE:W[:W]``: a file named with its weights, as the tools take it (merge, bake, the web UI's lines)."""
from __future__ import annotations


def split_weights(spec: str, most: int) -> tuple[str, list[float]]:
    """``"path:0.8:-1"`` -> ``("path", [0.8, -1.0])``: up to ``most`` trailing numbers (a Windows drive
    letter or a path with ':' is left alone because it does not parse as a number)."""
    path, numbers = spec, []
    while len(numbers) < most and ":" in path:
        head, tail = path.rsplit(":", 1)
        try:
            numbers.insert(0, float(tail))
        except ValueError:
            break
        path = head
    return path, numbers
