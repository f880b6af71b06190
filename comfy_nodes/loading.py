"""Parsed LoRAs and names, shared by every node of the process.

- :data:`CACHE`: lora-engine's :class:`~lora_engine.library.parsed.LoraCache` (keyed by real path, size and
  mtime), so a node re-run with another strength reads and parses no file, and a file re-saved
  under the same name is read again (ComfyUI's own loader keeps the old tensors).
- :data:`LORAS`: lora-engine's :class:`~lora_engine.loras.Loras` over ComfyUI's ``loras`` folders and
  that cache, the one path from a ``<lora:NAME>`` tag to a stack entry (names by stem, ``sub/stem``,
  alias, hash prefix); rescanned when ComfyUI's file list changes and once for a name not found.
"""
from __future__ import annotations

import os
import threading

from lora_engine.errors import LoraEngineError
from lora_engine.formats import LoraFile
from lora_engine.library.index import LoraEntry, LoraLibrary
from lora_engine.library.parsed import LoraCache
from lora_engine.loras import Loras
from lora_engine.patch import StackEntry
from lora_engine.syntax.blocks import lbw_ratios

from . import folders

CACHE = LoraCache()
LORAS = Loras(cache=CACHE, library_cache=True)
_listed: tuple | None = None  # ComfyUI's (folders, file names) at the last scan
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


def stack_entry(name: str, te: float, unet: float, block_weights: str | None = None) -> StackEntry:
    """A stack entry for a listed LoRA name at these strengths (negative allowed)."""
    try:
        ratio = lbw_ratios(block_weights)
    except ValueError as e:
        raise LoraEngineError(f"{name}: block weights {block_weights!r}: {e}") from None
    return StackEntry(load_named(name), te=float(te), unet=float(unet), block_multiplier=ratio, key=name)


def library() -> LoraLibrary:
    """The library over the current ``loras`` folders, rescanned when ComfyUI's list changes."""
    global _listed
    listed = (tuple(folders.lora_folders()), tuple(folders.lora_names()))
    with _lock:
        LORAS.set_folders(listed[0])
        if _listed is not None and _listed != listed:
            LORAS.rescan()
        _listed = listed
        return LORAS.library


def resolve(name: str) -> LoraEntry:
    """The library entry a tag name means; :class:`~lora_engine.errors.NameResolutionError` otherwise."""
    library()
    return LORAS.resolve(name)
