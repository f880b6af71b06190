"""The library's sidecar cache: per-file hashes, metadata and format summary, keyed by
absolute path and valid only while the file's size and mtime (ns) are unchanged.

Stored as one JSON file, written atomically (temporary file + ``os.replace``), so a
crash never leaves a half-written cache; a cache that cannot be read is ignored (and
rebuilt) with one warning, never an exception. It is written with ASCII escapes, so any
Python string (a file name decoded with ``surrogateescape`` included) round-trips exactly;
metadata read back goes through :func:`lora_engine.text.clean_value`, so a cache written by
anything else cannot bring unprintable text into the library either.
"""
from __future__ import annotations

import json
import os
import tempfile

from ..text import clean_value
from ..formats.safetensors_writer import ordinary_mode

CACHE_VERSION = 1
DEFAULT_CACHE_NAME = ".lora-engine-cache.json"


class LibraryCache:
    """``get(path, size, mtime_ns) -> record | None``, ``put(...)``, ``prune(paths)``, ``save()``."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else os.fspath(path)
        self.warnings: list[str] = []
        self._entries: dict[str, dict] = {}
        self._dirty = False
        if self.path and os.path.exists(self.path):
            self._load()

    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError, RecursionError) as e:
            self.warnings.append(f"{self.path}: hash cache unreadable ({str(e)[:120]}); rebuilding it")
            return
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
            self.warnings.append(f"{self.path}: hash cache has an unknown layout; rebuilding it")
            return
        self._entries = {k: v for k, v in data["entries"].items() if isinstance(v, dict)}
        for rec in self._entries.values():
            if "metadata" in rec:
                rec["metadata"] = clean_value(rec["metadata"])

    def get(self, path: str, size: int, mtime_ns: int) -> dict | None:
        rec = self._entries.get(path)
        if rec is None or rec.get("size") != size or rec.get("mtime_ns") != mtime_ns:
            return None
        return rec

    def put(self, path: str, size: int, mtime_ns: int, record: dict) -> None:
        self._entries[path] = dict(record, size=size, mtime_ns=mtime_ns)
        self._dirty = True

    def prune(self, keep: set[str], under: list[str]) -> int:
        """Forget files below the folders ``under`` that are not in ``keep`` (files of other
        libraries sharing this cache are left alone); returns how many were dropped."""
        prefixes = tuple(os.path.join(u, "") for u in under)
        gone = [p for p in self._entries if p not in keep and p.startswith(prefixes)]
        for p in gone:
            del self._entries[p]
        self._dirty = self._dirty or bool(gone)
        return len(gone)

    def save(self) -> None:
        if not self.path or not self._dirty:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".lora-engine-cache.", suffix=".tmp", dir=folder)
            ordinary_mode(tmp)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"version": CACHE_VERSION, "entries": self._entries}, fh)
            os.replace(tmp, self.path)
            tmp = None
            self._dirty = False
        except (OSError, ValueError) as e:  # ValueError: a value JSON cannot hold (nothing the library stores)
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)[:120]
            self.warnings.append(f"{self.path}: cannot write hash cache ({why}); hashes will be recomputed")
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
