"""LoRA Info: what a file is (format, types, ranks, base architecture), its hashes, trigger
words / activation text, and, when MODEL/CLIP are connected, how many of its modules this model has."""
from __future__ import annotations

import json
import os

from lora_engine.library.summary import format_summary, summarize
from lora_engine.errors import LoraEngineError
from lora_engine.library.hashes import hash_file, short_hash
from lora_engine.patch import StackEntry, build_plan

from . import common, loading
from .apply import keymap_for


def trigger_words(metadata: dict, user_metadata: dict, top: int = 12) -> list[str]:
    """User ``activation text`` (A1111 sidecar ``.json``) first, then kohya's most frequent caption tags."""
    words = []
    act = user_metadata.get("activation text")
    if isinstance(act, str) and act.strip():
        words.append(act.strip())
    try:
        freq = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        freq = {}
    counts: dict[str, int] = {}
    for tags in (freq.values() if isinstance(freq, dict) else ()):
        for tag, n in (tags.items() if isinstance(tags, dict) else ()):
            if isinstance(n, (int, float)):
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    words.extend(t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top] if t)
    return words


def _user_metadata(path: str) -> dict:
    real = os.path.realpath(path)
    for e in loading.library().entries:
        if os.path.realpath(e.path) == real:
            return dict(e.sidecars.user_metadata)
    return {}


def coverage_line(lf, model, clip) -> str:
    """``this model: N of M modules match`` plus the core's diagnosis of the rest."""
    plan = build_plan([StackEntry(lf)], keymap_for(model, clip))
    report = next(iter(plan.reports.values()))
    line = f"this model: {report.touched} of {len(lf.modules)} modules match"
    return line + (f"; {report.diagnosis}" if report.unmatched else "")


def describe(lora_name: str, model=None, clip=None) -> str:
    path = loading.folders.lora_path(lora_name)
    lf = loading.CACHE.get(path)
    lines = [format_summary(summarize(lf))]
    h = hash_file(path)
    lines.append(f"  hashes: sha256 {h.sha256}  AutoV2 {h.sha256[:10]}  A1111 short {short_hash(h.addnet, lf.metadata)}"
                 f"  addnet {h.addnet}  legacy {h.legacy}")
    words = trigger_words(lf.metadata, _user_metadata(path))
    lines.append("  trigger words: " + (", ".join(words) if words else "(none recorded)"))
    if model is not None or clip is not None:
        lines.append("  " + coverage_line(lf, model, clip))
    return "\n".join(lines)


class LoraEngineInfo:
    DESCRIPTION = "Metadata, hashes, trigger words and architecture check of a LoRA, as text."
    CATEGORY = common.CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    FUNCTION = "info"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": common.lora_combo()},
                "optional": {"model": ("MODEL",), "clip": ("CLIP",)}}

    @classmethod
    def IS_CHANGED(cls, lora_name, **_):
        return loading.file_signature(lora_name)

    def info(self, lora_name, model=None, clip=None):
        try:
            text = describe(lora_name, model, clip)
        except LoraEngineError as e:
            text = f"{lora_name}: {e}"
        return {"ui": {"text": [text]}, "result": (text,)}
