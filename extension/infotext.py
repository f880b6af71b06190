"""Infotext glue: the paste hook that maps ``<lora:NAME`` back to local files by ``Lora hashes``.

(Writing ``Lora hashes`` happens in ``network._record``: ``p.extra_generation_params``; A1111 quotes
the value.) ``on_infotext_pasted(infotext, params)`` receives the parsed fields; the core does the
rewrite (``lora_engine.syntax.infotext.rewrite_prompt``), here we only pick the fields.
"""
from __future__ import annotations

from lora_engine.syntax.infotext import addnet_tags, parse_lora_hashes, rewrite_prompt

PROMPT_FIELDS = ("Prompt", "Negative prompt", "Hires prompt", "Hires negative prompt")


def on_infotext_pasted(controller, infotext: str, params: dict) -> list[str]:
    """Rewrite pasted prompts in ``params`` in place; returns notes for names that could not be mapped.

    Legacy AddNet fields become appended ``<lora:...>`` tags, unless the built-in Lora extension is
    loaded: its own paste hook already appends them."""
    notes: list[str] = []
    if controller.builtin is None and isinstance(params.get("Prompt"), str):
        tags = addnet_tags(params, controller.get_library())
        if tags:
            params["Prompt"] = " ".join([params["Prompt"]] + tags).strip()
    raw = params.get("Lora hashes")
    if not raw:
        return notes
    hashes = parse_lora_hashes(str(raw))
    lookup = _HashLookup(controller)
    for key in PROMPT_FIELDS:
        if isinstance(params.get(key), str):
            params[key], n = rewrite_prompt(params[key], hashes, lookup)
            notes.extend(n)
    return notes


class _HashLookup:
    """The library as ``rewrite_prompt`` needs it. Only hashes already known are compared (from the
    file's metadata, the library cache, or files used in this session), as A1111 does: a paste
    never reads the whole library."""

    def __init__(self, controller):
        self.c = controller
        self.lib = controller.get_library()

    def find_by_hash(self, h: str):
        h = h.strip().lower()
        return [e for e in self.lib.entries
                if any(v and v.lower().startswith(h) for v in (self.c.known_short_hash(e), e.addnet_hash, e.sha256))]

    def preferred_name(self, entry) -> str:
        return self.lib.preferred_name(entry)
