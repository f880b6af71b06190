"""Infotext helpers: write ``Lora hashes`` as A1111 1.10 does, and map pasted prompts back
to local files by hash (A1111 ``extensions-builtin/Lora``: ``lora_script.py`` ``infotext_pasted``; the host
side is in docs/hosts.md).

Writing: each mentioned name loses ``:`` and ``,``; later mentions of a name replace the
hash of earlier ones but keep their place; pairs are joined with ``", "`` and, because the
value always contains ``:``, the infotext quotes it with ``json.dumps`` (non-ASCII kept):
``Lora hashes: "name: 0123456789ab, other: 89abcdef0123"``.

Reading: the value is split on ``,`` and each part on its first ``:``. Every
``<lora:NAME`` (or ``<lyco:NAME``) whose NAME has a hash there that a local file has is
rewritten to that file's preferred name, so renamed files still resolve.
"""
from __future__ import annotations

import json
import re
from typing import Iterable

from ..errors import NameResolutionError

_REMOVE = str.maketrans("", "", ":,")
_FIELD_RE = re.compile(r"Lora hashes:\s*(\"(?:\\.|[^\\\"])*\"|[^,\n]*)")
_TAG_NAME_RE = re.compile(r"<(lora|lyco):([^:<>]+)(?=[:>])")


def lora_hashes_value(pairs: Iterable[tuple[str, str]]) -> str:
    """``"name: hash, ..."`` from (mentioned name, short hash) pairs; empty names/hashes skipped."""
    table: dict[str, str] = {}
    for name, short in pairs:
        if name and short:
            table[name.translate(_REMOVE)] = short
    return ", ".join(f"{k}: {v}" for k, v in table.items())


def lora_hashes_field(pairs: Iterable[tuple[str, str]]) -> str:
    """The infotext field, ``Lora hashes: "…"``, or ``""`` when there is nothing to record."""
    value = lora_hashes_value(pairs)
    return f"Lora hashes: {json.dumps(value, ensure_ascii=False)}" if value else ""


def hashes_for_tags(tags, library) -> tuple[list[tuple[str, str]], list[str]]:
    """(mentioned name, short hash) for each tag that resolves in ``library``; warnings for the rest."""
    pairs, warnings = [], []
    for tag in tags:
        try:
            entry = library.resolve(tag.name)
        except NameResolutionError as e:
            warnings.append(str(e))
            continue
        if entry.short_hash:
            pairs.append((tag.name, entry.short_hash))
    return pairs, warnings


def parse_lora_hashes(value: str) -> dict[str, str]:
    """``"a: 0123, b: 4567"`` -> ``{"a": "0123", "b": "4567"}`` (parts without ``:`` are skipped)."""
    out: dict[str, str] = {}
    for part in value.split(","):
        name, sep, short = part.partition(":")
        if sep and name.strip() and short.strip():
            out[name.strip()] = short.strip()
    return out


def find_lora_hashes(infotext: str) -> dict[str, str]:
    """The ``Lora hashes`` table of a whole pasted parameters text (empty when absent)."""
    m = _FIELD_RE.search(infotext or "")
    if not m:
        return {}
    raw = m.group(1).strip()
    if raw.startswith('"'):
        try:
            raw = json.loads(raw)
        except ValueError:
            raw = raw.strip('"')
    return parse_lora_hashes(raw)


def rewrite_prompt(prompt: str, hashes: dict[str, str], library) -> tuple[str, list[str]]:
    """Replace tag names found in ``hashes`` by the local file with that hash.

    Returns the new prompt and one line per name that could not be mapped."""
    notes: list[str] = []

    def replace(m: re.Match) -> str:
        name = m.group(2)
        short = hashes.get(name.strip())
        if short is None:
            return m.group(0)
        found = library.find_by_hash(short)
        if not found:
            notes.append(f"{name}: no local file has hash {short}")
            return m.group(0)
        if len({e.addnet_hash for e in found}) > 1:
            notes.append(f"{name}: hash {short} matches {len(found)} different files; left as written")
            return m.group(0)
        return f"<{m.group(1)}:{library.preferred_name(found[0])}"

    return _TAG_NAME_RE.sub(replace, prompt), notes


_ADDNET_NAME_RE = re.compile(r"(.*?)\s*\(([0-9a-fA-F]+)\)\s*\Z")


def addnet_tags(params: dict[str, str], library=None) -> list[str]:
    """Tags for the legacy kohya AddNet fields (``AddNet Module N: LoRA``, ``AddNet Model N:
    name(hash)``, ``AddNet Weight A N``), as A1111 appends them on paste. With a library, a
    name whose legacy 8-hex hash matches exactly one local file is replaced by that file."""
    tags = []
    for key in params:
        if not key.startswith("AddNet Model ") or params.get("AddNet Module " + key[13:]) != "LoRA":
            continue
        name, legacy = str(params[key]).strip(), None
        m = _ADDNET_NAME_RE.match(name)
        if m:
            name, legacy = m.group(1), m.group(2).lower()
        if library is not None and legacy:
            found = [e for e in library.entries if e.legacy_hash == legacy]
            if len(found) == 1:
                name = library.preferred_name(found[0])
        weight = str(params.get("AddNet Weight A " + key[13:], "1.0")).strip()
        tags.append(f"<lora:{name}:{weight}>")
    return tags
