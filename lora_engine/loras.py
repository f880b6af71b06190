"""The one path from a ``<lora:…>`` tag (or a listed name) to a stack entry the engine applies.

    loras = Loras(["models/Lora"])
    entries, warnings = loras.entries(parse_prompt(text).tags)
    engine = LoraEngine.for_model(model)
    engine.set_stack(entries)

A name resolves in the library (stem, ``sub/stem``, alias, hash prefix; the folders are rescanned once
when a name is not found, so a file added since the last scan is used at once), the file is parsed
once and kept in the LRU of parsed files (keyed by real path, size and mtime), and the tag's strengths,
block weights and ``dyn`` become a :class:`~lora_engine.patch.StackEntry`. Every host and front-end
(the A1111 extension, the ComfyUI nodes, ``generate``, the web UI, the demo) goes through this module,
so a tag means the same file and the same numbers everywhere.
"""
from __future__ import annotations

import os
import random
from typing import Iterable

from .errors import LoraEngineError, first_line
from .formats import LoraFile
from .library.index import LoraEntry, LoraLibrary
from .library.parsed import LoraCache
from .patch import StackEntry
from .syntax.blocks import block_ratios
from .syntax.prompt import LoraTag


def stack_entry(lora: LoraFile, tag: LoraTag, *, key: str | None = None,
                rng: random.Random | None = None) -> StackEntry:
    """The stack entry of a parsed tag on its parsed file: te/unet strengths, block ratios (``R``/``U``
    entries of a block vector drawn once, from ``rng``), ``dyn``. ``key`` identifies the entry in the
    stack (default: the file's path)."""
    return StackEntry(lora, te=tag.te, unet=tag.unet, block_multiplier=block_ratios(tag, rng), dyn=tag.dyn, key=key)


class Loras:
    """LoRA folders + the parsed-file cache → stack entries.

    ``cache``: a shared :class:`LoraCache` (a host keeps one per process); ``library_cache``: the
    path of the library's JSON sidecar cache (hashes, metadata), ``True`` for the default place (in
    the first folder), ``False`` for memory only; ``hash_files``: compute whole-file hashes at scan
    time (hosts compute them lazily instead)."""

    def __init__(self, folders: Iterable[str | os.PathLike] = (), *, cache: LoraCache | None = None,
                 library_cache: str | os.PathLike | bool = False, hash_files: bool = False,
                 library: LoraLibrary | None = None):
        """``library``: an existing library to use (its folders; e.g. the one a host's pages show)."""
        self.cache = cache if cache is not None else LoraCache()
        self.library_cache = library_cache
        self.hash_files = hash_files
        self._folders = list(library.folders) if library is not None else [os.path.abspath(os.fspath(f)) for f in folders]
        self._library: LoraLibrary | None = library

    # ---- the library ------------------------------------------------------------------------------
    @property
    def folders(self) -> list[str]:
        return list(self._folders)

    def set_folders(self, folders: Iterable[str | os.PathLike]) -> None:
        """Use other folders (the library is rebuilt and rescanned at the next use when they differ)."""
        folders = [os.path.abspath(os.fspath(f)) for f in folders]
        if folders != self._folders:
            self._folders, self._library = folders, None

    @property
    def library(self) -> LoraLibrary:
        """The library over the folders, scanned on first use."""
        if self._library is None:
            use_cache = self.library_cache is not False
            path = None if isinstance(self.library_cache, bool) else self.library_cache
            lib = LoraLibrary(self._folders, cache_path=path, use_cache=use_cache, hash_files=self.hash_files)
            lib.scan()
            self._library = lib
        return self._library

    def rescan(self):
        """Scan the folders again (unchanged files are answered by the sidecar cache)."""
        return self.library.scan() if self._library is not None else self.library

    # ---- names → files → entries --------------------------------------------------------------------
    def resolve(self, name: str) -> LoraEntry:
        """The library entry ``name`` means; rescans once on a miss. :class:`NameResolutionError` otherwise."""
        return self.library.resolve(name, rescan_if_missing=True)

    def file(self, name: str) -> LoraFile:
        """The parsed LoRA file of a name (from the LRU when unchanged on disk)."""
        return self.cache.get(self.resolve(name).path)

    def entry(self, tag: LoraTag, *, key: str | None = None, rng: random.Random | None = None) -> StackEntry:
        """The stack entry of one tag; lora-engine errors (unknown name, unreadable file) propagate."""
        lora = self.file(tag.name)
        return stack_entry(lora, tag, key=key or lora.path, rng=rng)

    def entries(self, tags: Iterable[LoraTag], *, rng: random.Random | None = None
                ) -> tuple[list[StackEntry], list[str]]:
        """Stack entries of the usable tags and one warning line per tag that cannot be used (the
        others still apply)."""
        out, warnings = [], []
        for tag in tags:
            try:
                out.append(self.entry(tag, rng=rng))
            except LoraEngineError as e:
                warnings.append(f"{tag.raw or tag.name}: {first_line(e)}; LoRA skipped")
        return out, warnings

    def apply(self, engine, tags: Iterable[LoraTag], *, rng: random.Random | None = None) -> list[str]:
        """Put the tags' LoRAs on ``engine`` (a :class:`~lora_engine.engine.LoraEngine`); returns every
        warning line (tags skipped, modules unmatched)."""
        entries, warnings = self.entries(tags, rng=rng)
        engine.set_stack(entries)
        return warnings + engine.warnings()
