"""Preview images made on demand: the configured model (the demo model by default) draws the LoRA at
weight 1 and the picture is saved as ``STEM.preview.png`` beside the file, the name A1111 and the
library read as the card's preview. No gradio here.

The prompt defaults to the LoRA's most frequent training caption tag (``ss_tag_frequency``), else
its title. A preview the user put there under another name (``STEM.png``…) is never replaced; our
own ``STEM.preview.png`` is (that is its purpose), but not through a symlink.
"""
from __future__ import annotations

import json
import os
from collections import Counter

from ...errors import LoraEngineError, ToolError
from ...library.index import LoraEntry
from .context import UiContext
from .sweep import SweepSpec

SUFFIX = ".preview.png"
SIZE = 256  # pixels per side of the saved picture (the model's output is scaled up, nearest neighbour)


def preview_prompt(entry: LoraEntry) -> str:
    """The most frequent tag of the training captions, else the title."""
    try:
        folders = json.loads(entry.metadata.get("ss_tag_frequency") or "{}")
        counts = Counter()
        for tags in folders.values():
            counts.update({str(t).strip(): int(n) for t, n in tags.items() if str(t).strip()})
        if counts:
            return counts.most_common(1)[0][0]
    except (ValueError, TypeError, AttributeError):
        pass
    return entry.alias


def wanting_preview(ctx: UiContext) -> str | None:
    """The first readable file without a preview (the preview form's default), else the first readable one."""
    readable = [e for e in ctx.library.entries if not e.unreadable]
    return next((e.key for e in readable if not e.sidecars.preview), readable[0].key if readable else None)


def make_preview(ctx: UiContext, key: str, prompt: str = "", steps: int = 20, seed: int = 0,
                 progress=None) -> str:
    """Draw and save the preview of library file ``key``; the line to show."""
    try:
        entry = ctx.entry((key or "").strip())
        if entry is None:
            raise ToolError(f"LoRA {key!r} is not in the library")
        if entry.unreadable:
            raise ToolError(f"{entry.key}: unreadable, no preview can be drawn")
        target = os.path.join(os.path.dirname(entry.path), entry.stem + SUFFIX)
        own = entry.sidecars.preview
        if own and os.path.basename(own) != os.path.basename(target):
            raise ToolError(f"{entry.key} has its own preview ({os.path.basename(own)}); it is not replaced")
        if os.path.islink(target):
            raise ToolError(f"{entry.key}: {os.path.basename(target)} is a symlink; not written through")
        text = (prompt or "").strip() or preview_prompt(entry)
        cells, _ = ctx.generate_session().cells(SweepSpec(text, (entry.key,), (1.0,), int(seed), int(steps)),
                                                progress, image=False)
        _save(cells[0][0], target)
    except LoraEngineError as e:
        return f"error: {e}"
    ctx.scan()
    return f"wrote {target} ({text!r})"


def _save(image, target: str) -> None:
    from ..demo.grid import to_pil

    im = to_pil(image, max(1, SIZE // image.shape[-1]))
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{os.getpid()}.tmp")
    try:
        im.save(tmp, "PNG")
        os.replace(tmp, target)
    except OSError as e:
        raise ToolError(f"{target}: cannot write the preview ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
