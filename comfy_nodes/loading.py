"""Parsed LoRAs and names, shared by every node of the process.

- :data:`CACHE`: lora-engine's :class:`~lora_engine.library.parsed.LoraCache` (keyed by real path, size and
  mtime), so a node re-run with another strength reads and parses no file, and a file re-saved
  under the same name is read again (ComfyUI's own loader keeps the old tensors).
- :func:`library`: lora-engine's :class:`~lora_engine.library.index.LoraLibrary` over ComfyUI's
  ``loras`` folders, the one resolver for ``<lora:NAME>`` tag names (stem, ``sub/stem``, alias,
  hash prefix); rescanned when ComfyUI's file list changes.
"""
from __future__ import annotations

import os
import threading

from lora_engine.syntax.blocks import ModuleMultiplier, resolve_lbw
from lora_engine.library.parsed import LoraCache
from lora_engine.errors import LoraEngineError
from lora_engine.formats import LoraFile
from lora_engine.library.index import LoraEntry, LoraLibrary
from lora_engine.patch import StackEntry

from . import folders

CACHE = LoraCache()
_library: tuple[tuple, LoraLibrary] | None = None
_lock = threading.Lock()


def load_named(name: str) -> LoraFile:
    """The parsed LoRA of a name from ComfyUI's list (cached)."""
    return CACHE.get(folders.lora_path(name))


def path_signature(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def file_signature(name: str) -> str:
    """What ``IS_CHANGED`` returns: path, size and mtime of the file (a re-saved file re-runs the node)."""
    try:
        return path_signature(folders.lora_path(name))
    except (LoraEngineError, OSError):
        return f"missing:{name}"


def tag_signature(name: str) -> str:
    """The same for a ``<lora:NAME>`` tag name (resolved with the library)."""
    try:
        return path_signature(resolve(name).path)
    except (LoraEngineError, OSError):
        return f"missing:{name}"


def block_ratio(block_weights: str | None):
    """Per-module ratio from an LBW vector or preset (``"1,0,0,…"``, ``"INS"``); None when empty.

    Raises :class:`ValueError` with the reason for a malformed string."""
    if not block_weights or not block_weights.strip():
        return None
    spec = resolve_lbw(block_weights.strip())
    return ModuleMultiplier(1.0, 1.0, spec.resolve(1.0))


def stack_entry(name: str, te: float, unet: float, block_weights: str | None = None) -> StackEntry:
    """A stack entry for a listed LoRA name at these strengths (negative allowed)."""
    try:
        ratio = block_ratio(block_weights)
    except ValueError as e:
        raise LoraEngineError(f"{name}: block weights {block_weights!r}: {e}") from None
    return StackEntry(load_named(name), te=float(te), unet=float(unet), block_multiplier=ratio, key=name)


def library() -> LoraLibrary:
    """The library over the current ``loras`` folders, rescanned when ComfyUI's list changes."""
    global _library
    names = tuple(folders.lora_names())
    roots = tuple(folders.lora_folders())
    with _lock:
        if _library is None or _library[0] != (roots, names):
            lib = LoraLibrary(roots, hash_files=False)
            lib.scan()
            _library = ((roots, names), lib)
        return _library[1]


def resolve(name: str) -> LoraEntry:
    """The library entry a tag name means; :class:`~lora_engine.errors.NameResolutionError` otherwise."""
    return library().resolve(name)
