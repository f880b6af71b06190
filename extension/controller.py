"""Process-wide state of the extension: settings, library, file cache, the current model's runtime.

One ``Controller`` lives per A1111 process (``callbacks.controller()``); the extra network, the
step callback, the API and the cards page all talk to it. It is plain Python: tests build one
with their own ``opts`` object and folders.
"""
from __future__ import annotations

import os

from lora_engine.engine import Mode as EngineMode
from lora_engine.library.hashes import hash_file
from lora_engine.library.index import LoraLibrary
from lora_engine.library.parsed import LoraCache
from lora_engine.loras import Loras

from .conds import CondGuard
from .runtime import ModelRuntime
from .settings import Settings


class ModeChooser:
    """The ``automatic`` mode: merged while the stack stays put, on the fly when the batch needs
    per-image/negative/scheduled factors or the stack changed at each of the last two generations
    (a merge that is undone next time costs more than hooks). Over a model with quantized weights (A1111's
    FP8 weight option) it is always on the fly: the fp8 layers run as they are, nothing is re-quantized."""

    def __init__(self):
        self.last: dict[str, tuple] = {}
        self.changes: dict[str, int] = {}

    def choose(self, setting: str, batch, pass_kind: str, current: EngineMode, quantized: bool = False) -> EngineMode:
        sig = tuple(sorted(v.ident for v in batch.variants))
        prev = self.last.get(pass_kind)
        self.last[pass_kind] = sig
        self.changes[pass_kind] = self.changes.get(pass_kind, 0) + 1 if prev is not None and prev != sig else 0
        if setting == "merged":
            return EngineMode.MERGED
        if setting == "on the fly":
            return EngineMode.ONTHEFLY
        if not batch.variants:
            return current
        if quantized:
            return EngineMode.ONTHEFLY
        if not batch.uniform or self.changes[pass_kind] >= 2:
            return EngineMode.ONTHEFLY
        return EngineMode.MERGED


class Controller:
    def __init__(self, opts=None, folders: list[str] | tuple[str, ...] = (), cache_path: str | None = None):
        self.opts = opts
        self.base_folders = [os.fspath(f) for f in folders]
        self.cache_path = cache_path
        self.loras = Loras(cache=LoraCache(int(self.settings().cache_mb * 1024 ** 2)),
                           library_cache=cache_path if cache_path is not None else True)
        self.runtime: ModelRuntime | None = None
        self.modes = ModeChooser()
        self.cond_guard = CondGuard()
        self.builtin = None  # the built-in Lora's extra network, when it exists
        self.network = None  # our extra network object, once registered (``callbacks.before_ui``)
        self.builtin_cards = False  # the built-in Lora's cards are shown instead of ours (tags handed over)
        self.builtin_dirty = True  # the built-in may have merged something we must undo first
        self.last_warnings: list[str] = []
        self._hashes: dict[tuple[str, int], str] = {}

    def settings(self) -> Settings:
        return Settings.from_opts(self.opts)

    def folders(self) -> list[str]:
        return list(dict.fromkeys(self.base_folders + list(self.settings().folders)))

    # ---- library --------------------------------------------------------------------------------
    @property
    def cache(self) -> LoraCache:
        return self.loras.cache

    def get_library(self) -> LoraLibrary:
        self.loras.set_folders(self.folders())
        self.loras.cache.max_bytes = int(self.settings().cache_mb * 1024 ** 2)
        return self.loras.library

    def refresh(self):
        self.get_library()
        return self.loras.rescan()

    def short_hash(self, entry) -> str | None:
        """A1111's 12-hex shorthash; computed on first use (a listing never reads whole files)."""
        if entry.short_hash:
            return entry.short_hash
        key = (entry.path, entry.mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = hash_file(entry.path).addnet[:12]
        return self._hashes[key]

    def known_short_hash(self, entry) -> str | None:
        """The shorthash if it is known without reading the file."""
        return entry.short_hash or self._hashes.get((entry.path, entry.mtime_ns))

    def entry(self, name: str):
        """The library entry of a tag name (the folders are rescanned once for a name not found)."""
        self.get_library()
        return self.loras.resolve(name)

    def resolve(self, name: str):
        """``batch.Resolver``: (LoraFile, identity incl. mtime, short hash); raises LoraEngineError."""
        e = self.entry(name)
        lf = self.cache.get(e.path)
        return lf, f"{e.path}@{e.mtime_ns}", self.short_hash(e)

    # ---- model ----------------------------------------------------------------------------------
    def model_loaded(self, sd_model) -> None:
        """A checkpoint was (re)loaded: its weights are new, so old backups are dropped unwritten."""
        if self.runtime is not None:
            self.runtime.drop()
        self.runtime = None
        self.cond_guard.last = None
        self.builtin_dirty = True

    def runtime_for(self, sd_model) -> ModelRuntime:
        """The engine for this model; rebuilt (after restoring the weights) for another model or when
        the backups setting moved them elsewhere."""
        s = self.settings()
        rt = self.runtime
        if rt is None or rt.sd_model is not sd_model or rt.engine.backup_device != s.backup_device:
            if rt is not None:
                rt.clear()
            self.runtime = ModelRuntime(sd_model, s.backup_device)
        self.runtime.engine.force_foreign = s.force_foreign  # read at every apply
        self.runtime.engine.max_strength = s.max_strength
        return self.runtime

    def state(self) -> dict:
        s = self.settings()
        out = {"settings": vars(s) | {"folders": self.folders()}, "warnings": self.last_warnings,
               "cache": {"files": len(self.cache), "bytes": self.cache.bytes, "max_bytes": self.cache.max_bytes,
                         "hits": self.cache.hits, "misses": self.cache.misses},
               "model": None if self.runtime is None else self.runtime.state()}
        return out
