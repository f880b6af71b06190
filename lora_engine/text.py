"""Text that always prints: lone UTF-16 surrogates replaced by U+FFFD.

JSON can spell a lone surrogate (``"\\ud800"``) and Python's ``json`` decodes it into a ``str``
that cannot be encoded as UTF-8: printing it, writing it to a UTF-8 file or sending it to a
browser raises ``UnicodeEncodeError``. Python writers produce such strings from undecodable
file names (``surrogateescape``). Text read from a LoRA file or its sidecars goes through
:func:`clean_text` / :func:`clean_value` once, where it is read, so every later consumer
(printers, the library cache, ``--json`` output, the web UI) gets valid Unicode.
"""
from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def has_surrogate(s: str) -> bool:
    return not s.isascii() and _SURROGATE.search(s) is not None


def clean_text(s: str) -> str:
    """``s`` with every lone surrogate replaced by U+FFFD (a surrogate pair is decoded by ``json`` into one
    character, so any surrogate left in a ``str`` is lone)."""
    return s if s.isascii() else _SURROGATE.sub("\ufffd", s)


def clean_value(v):
    """:func:`clean_text` applied to every string (keys too) of a JSON-like value; other values unchanged."""
    if isinstance(v, str):
        return clean_text(v)
    if isinstance(v, dict):
        return {clean_value(k): clean_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [clean_value(x) for x in v]
    return v
