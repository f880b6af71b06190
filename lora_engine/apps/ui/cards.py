"""Library cards as HTML (no gradio): a grid of tiles as in A1111's extra-networks page. A tile has the
preview (or a placeholder), the title, the file (key, size, date), architecture/format badges, the
short hash and description, one line per problem (exactly one for an unreadable file), and the
hashes and metadata in a ``<details>`` block.

Previews are embedded as ``data:`` URIs of small thumbnails, so no file route is needed (gradio's
file routes differ between 3.41 and current, and A1111 has its own). Every text from a file is
HTML-escaped. ``filter_entries`` is the search: every word of the query must appear in the card's
searchable text (names, alias, hashes, architecture, format, metadata values, description);
``sort_entries`` orders by title, date or size.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import json
import os
import re
import time

from ...families import FAMILIES
from ...library.index import LoraEntry

THUMB = 200
SHOWN_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_sd_model_name",
              "ss_num_train_images", "ss_max_train_steps", "ss_learning_rate", "modelspec.title",
              "ss_training_comment")
BADGE_COLOURS = {"SD1": "#2e7d32", "SD2": "#1565c0", "SDXL": "#6a1b9a", "Flux.1": "#e65100", "Chroma": "#ad1457",
                 "SD3": "#00838f", "other": "#616161", "unknown": "#9e9e9e"}
# every declared diffusion transformer by its label (Chroma LoRAs read as Flux.1: the same tree)
ARCH_FILTERS = ("all", "SD1", "SD2", "SDXL", *(f.label for f in FAMILIES if f.name != "chroma"), "other", "unknown")
SORTS = ("name", "newest", "oldest", "largest", "smallest")
MAX_CARDS = 200  # a page with thousands of cards is unusable; the search narrows it
GRID_STYLE = "display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px;align-items:start"


@functools.lru_cache(maxsize=512)
def _thumbnail(path: str, mtime_ns: int) -> str | None:
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
    except Exception:  # noqa: BLE001 - a broken preview must not break the page
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_uri(entry: LoraEntry) -> str | None:
    p = entry.sidecars.preview
    if not p:
        return None
    try:
        return _thumbnail(p, os.stat(p).st_mtime_ns)
    except OSError:
        return None


def search_text(entry: LoraEntry) -> str:
    parts = [entry.key, entry.stem, entry.alias, entry.sd_version, entry.format, entry.architecture,
             entry.short_hash or "", entry.addnet_hash or "", entry.sha256 or "", entry.sidecars.description or ""]
    parts += [str(v)[:500] for v in entry.metadata.values()]
    parts += [str(v)[:500] for v in entry.sidecars.user_metadata.values()]
    return " ".join(parts).lower()


def filter_entries(entries: list[LoraEntry], query: str = "", arch: str = "all") -> list[LoraEntry]:
    words = (query or "").lower().split()
    out = []
    for e in entries:
        if arch not in ("all", "", None) and arch not in e.sd_version.split("/"):  # "Flux.1/SD3": either
            continue
        text = search_text(e)
        if all(w in text for w in words):
            out.append(e)
    return out


def _natural(s: str) -> list:
    return [(0, int(t), "") if t.isdecimal() else (1, 0, t.lower()) for t in re.split(r"(\d+)", s) if t]


def sort_entries(entries: list[LoraEntry], how: str = "name") -> list[LoraEntry]:
    """``how``: name (title, natural order, then key), newest / oldest (mtime), largest / smallest (size)."""
    by_name = sorted(entries, key=lambda e: (_natural(e.alias), _natural(e.key)))
    if how in ("newest", "oldest"):
        return sorted(by_name, key=lambda e: e.mtime_ns, reverse=how == "newest")
    if how in ("largest", "smallest"):
        return sorted(by_name, key=lambda e: e.size, reverse=how == "largest")
    return by_name


def problem_lines(entry: LoraEntry) -> list[str]:
    """Each distinct problem once, without the file's path in front (the card names the file); an
    unreadable file has one line (why it cannot be read)."""
    own = entry.path + ": "
    lines = list(dict.fromkeys(p[len(own):] if p.startswith(own) else p for p in entry.problems))
    return lines[:1] if entry.unreadable else lines


def _badge(text: str, colour: str) -> str:
    return (f'<span class="le-badge" style="background:{colour};color:#fff;border-radius:4px;padding:1px 6px;'
            f'margin-right:4px;font-size:12px">{html.escape(text)}</span>')


def _row(key: str, value: str, limit: int = 160) -> str:
    v = value if len(value) <= limit else value[:limit] + "…"
    return (f'<tr><td style="color:#666;padding-right:8px;vertical-align:top">{html.escape(key)}</td>'
            f'<td style="word-break:break-all">{html.escape(v)}</td></tr>')


def _metadata_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _file_line(e: LoraEntry) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime_ns / 1e9))
    return f"{e.key} · {e.size / 1e6:.2f} MB · {when}"


def card_html(entry: LoraEntry) -> str:
    e = entry
    thumb = thumbnail_uri(e)
    box = "width:100%;aspect-ratio:1/1;border-radius:6px"
    img = (f'<img class="le-thumb" src="{thumb}" alt="preview" style="{box};object-fit:cover;display:block">'
           if thumb else
           f'<div class="le-thumb le-nopreview" style="{box};background:#eee;display:flex;align-items:center;'
           f'justify-content:center;color:#999">no preview</div>')
    badges = _badge(e.sd_version, BADGE_COLOURS.get(e.sd_version, "#9e9e9e")) + \
        (_badge("unreadable", "#b71c1c") if e.unreadable else _badge(e.format, "#455a64"))
    hash_line = (f'<div class="le-hash" style="font-size:12px;color:#666">hash {html.escape(e.short_hash)}</div>'
                 if e.short_hash else "")
    desc = (f'<div class="le-desc" style="margin:4px 0;font-size:13px">{html.escape(e.sidecars.description[:400])}'
            '</div>' if e.sidecars.description else "")
    problems = "".join(f'<div class="le-problem" style="color:#b71c1c;font-size:12px;word-break:break-all">'
                       f'⚠ {html.escape(p)}</div>' for p in problem_lines(e))
    rows = ([_row("sha256", e.sha256)] if e.sha256 else []) + ([_row("addnet hash", e.addnet_hash)]
                                                               if e.addnet_hash else [])
    rows += [_row(k, _metadata_value(e.metadata[k])) for k in SHOWN_KEYS if k in e.metadata]
    full = "".join(_row(k, _metadata_value(v), 400) for k, v in sorted(e.metadata.items()))
    details = (f'<details class="le-details"><summary>details ({len(e.metadata)} metadata keys)</summary>'
               f'<table class="le-meta" style="font-size:12px">{"".join(rows)}{full}</table></details>'
               if rows or full else '<div style="color:#999;font-size:12px">no metadata</div>')
    return (f'<div class="le-card" data-key="{html.escape(e.key, quote=True)}" style="border:1px solid #ddd;'
            f'border-radius:8px;padding:8px;min-width:0">{img}'
            f'<div class="le-title" style="font-weight:bold;font-size:15px;margin-top:6px;word-break:break-word">'
            f'{html.escape(e.alias)}</div><div class="le-file" style="font-size:12px;color:#666;word-break:break-all">'
            f'{html.escape(_file_line(e))}</div><div>{badges}</div>{hash_line}{desc}{problems}{details}</div>')


def cards_html(entries: list[LoraEntry], total: int | None = None, limit: int = MAX_CARDS, empty: str = "") -> str:
    """The grid of ``entries`` (already filtered and sorted) with a count line; ``empty``: what to say
    when the library itself has no file."""
    total = len(entries) if total is None else total
    head = f'<div class="le-count">{len(entries)} of {total} LoRA files</div>'
    if not entries:
        note = empty if (total == 0 and empty) else "nothing matches"
        return head + f'<div class="le-empty" style="color:#999">{html.escape(note)}</div>'
    more = (f'<div class="le-more">showing the first {limit}; search to narrow the list</div>'
            if len(entries) > limit else "")
    return (head + more + f'<div class="le-cards" style="{GRID_STYLE}">'
            + "".join(card_html(e) for e in entries[:limit]) + "</div>")
