"""Adapters from the engine's progress callbacks to a ``gr.Progress`` (same call in 3.41 and current:
``progress((done, total), desc=...)``)."""
from __future__ import annotations


def gradio_progress(progress, label: str, total: int | None = None):
    """``progress(done, total, what)`` for the tools, or ``progress(i, path)`` for a library scan
    (``total=None``: the count is not known in advance)."""

    def call(done, *rest):
        if len(rest) == 2:
            n, what = rest
            progress((int(done), int(n)), desc=f"{label}: {what}")
        else:
            progress((int(done) + 1, total), desc=f"{label}: {rest[0] if rest else ''}")
    return call
