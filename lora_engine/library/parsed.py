"""LRU cache of parsed LoRA files keyed by (real path, size, mtime), with a byte budget.

A LoRA that leaves the prompt and comes back is not re-read; a file changed on disk is.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

from ..formats import LoraFile, load_lora


class LoraCache:
    def __init__(self, max_bytes: int = 2 * 1024 ** 3):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[LoraFile, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key_of(path: str) -> tuple:
        real = os.path.realpath(path)
        st = os.stat(real)
        return (real, st.st_size, st.st_mtime_ns)

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self._items.values())

    def get(self, path: str | os.PathLike) -> LoraFile:
        path = os.fspath(path)
        try:
            key = self.key_of(path)
        except OSError:
            return load_lora(path)  # raises the clear "no such file" error
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return hit[0]
        lf = load_lora(path)
        size = lf.nbytes()
        with self._lock:
            self.misses += 1
            for old in [k for k in self._items if k[0] == key[0]]:  # older versions of this file
                del self._items[old]
            self._items[key] = (lf, size)
            while self.bytes > self.max_bytes and len(self._items) > 1:
                self._items.popitem(last=False)
        return lf

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
