"""Library cards as HTML (no gradio): preview, name, architecture/format badges, hashes, the main
training metadata, description, problems, and the full metadata in a ``<details>`` block.

Previews are embedded as ``data:`` URIs of small thumbnails, so no file route is needed (gradio's
file routes differ between 3.41 and current, and A1111 has its own). Every text from a file is
HTML-escaped. ``filter_entries`` is the search: every word of the query must appear in the card's
searchable text (names, alias, hashes, architecture, format, metadata values, description).
"""
from __future__ import annotations

import base64
import functools
import html
import io
import json

from ...library.index import LoraEntry

THUMB = 160
SHOWN_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_sd_model_name",
              "ss_num_train_images", "ss_max_train_steps", "ss_learning_rate", "modelspec.title",
              "ss_training_comment")
BADGE_COLOURS = {"SD1": "#2e7d32", "SD2": "#1565c0", "SDXL": "#6a1b9a", "other": "#616161", "unknown": "#9e9e9e"}
ARCH_FILTERS = ("all", "SD1", "SD2", "SDXL", "other", "unknown")
MAX_CARDS = 200  # a page with thousands of cards is unusable; the search narrows it


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
    import os

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
        if arch not in ("all", "", None) and e.sd_version != arch:
            continue
        text = search_text(e)
        if all(w in text for w in words):
            out.append(e)
    return out


def _badge(text: str, colour: str) -> str:
    return (f'<span class="le-badge" style="background:{colour};color:#fff;border-radius:4px;padding:1px 6px;'
            f'margin-right:4px;font-size:12px">{html.escape(text)}</span>')


def _row(key: str, value: str, limit: int = 160) -> str:
    v = value if len(value) <= limit else value[:limit] + "…"
    return (f'<tr><td style="color:#666;padding-right:8px;vertical-align:top">{html.escape(key)}</td>'
            f'<td style="word-break:break-all">{html.escape(v)}</td></tr>')


def _metadata_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def card_html(entry: LoraEntry) -> str:
    e = entry
    thumb = thumbnail_uri(e)
    img = (f'<img src="{thumb}" alt="preview" style="width:{THUMB}px;height:{THUMB}px;object-fit:cover;'
           'border-radius:6px">' if thumb else
           f'<div style="width:{THUMB}px;height:{THUMB}px;background:#eee;border-radius:6px;display:flex;'
           'align-items:center;justify-content:center;color:#999">no preview</div>')
    badges = _badge(e.sd_version, BADGE_COLOURS.get(e.sd_version, "#9e9e9e")) + _badge(e.format, "#455a64")
    rows = [_row("file", e.key + " (" + f"{e.size / 1e6:.2f} MB" + ")")]
    if e.short_hash:
        rows.append(_row("short hash", e.short_hash))
    if e.sha256:
        rows.append(_row("sha256", e.sha256))
    rows += [_row(k, _metadata_value(e.metadata[k])) for k in SHOWN_KEYS if k in e.metadata]
    desc = (f'<div class="le-desc" style="margin:4px 0">{html.escape(e.sidecars.description[:400])}</div>'
            if e.sidecars.description else "")
    problems = "".join(f'<div class="le-problem" style="color:#b71c1c">⚠ {html.escape(p)}</div>' for p in e.problems)
    full = "".join(_row(k, _metadata_value(v), 400) for k, v in sorted(e.metadata.items()))
    details = (f'<details><summary>all metadata ({len(e.metadata)} keys)</summary><table>{full}</table></details>'
               if e.metadata else '<div style="color:#999">no metadata</div>')
    return (f'<div class="le-card" data-key="{html.escape(e.key, quote=True)}" style="display:flex;gap:12px;'
            'border:1px solid #ddd;border-radius:8px;padding:8px;margin:6px 0">'
            f'{img}<div style="flex:1;min-width:0"><div class="le-title" style="font-weight:bold;font-size:16px">'
            f'{html.escape(e.alias)}</div><div>{badges}</div>{desc}<table class="le-meta" style="font-size:12px">'
            f'{"".join(rows)}</table>{problems}{details}</div></div>')


def cards_html(entries: list[LoraEntry], total: int | None = None, limit: int = MAX_CARDS) -> str:
    total = len(entries) if total is None else total
    head = f'<div class="le-count">{len(entries)} of {total} LoRA files</div>'
    if not entries:
        return head + '<div class="le-empty" style="color:#999">nothing matches</div>'
    more = (f'<div class="le-more">showing the first {limit}; search to narrow the list</div>'
            if len(entries) > limit else "")
    return head + more + '<div class="le-cards">' + "".join(card_html(e) for e in entries[:limit]) + "</div>"
