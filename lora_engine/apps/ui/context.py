"""What the web UI pages share: the LoRA folders, the output folder, the library and the model.

Pages receive one :class:`UiContext`; a host (the standalone server, the A1111 tab) builds it from
its own settings. Nothing here imports gradio, so it is tested without it.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from ...errors import ToolError
from ...library.index import LoraLibrary
from ...loras import Loras


@dataclass(frozen=True)
class UiConfig:
    """``lora_dirs``: folders shown in the Library; ``output_dir``: where the tools write (default:
    the first LoRA folder); ``model``: ``"demo"``, a diffusers folder, or None (Generate disabled)."""

    lora_dirs: tuple[str, ...]
    output_dir: str | None = None
    model: str | None = None
    hash_files: bool = True

    @property
    def out_dir(self) -> str:
        return os.path.abspath(self.output_dir or (self.lora_dirs[0] if self.lora_dirs else "."))


@dataclass
class UiContext:
    """``library``: a host's own :class:`LoraLibrary` (A1111 keeps one), else one over ``config.lora_dirs``;
    ``loras``: names → parsed files → stack entries over that library (what Generate applies)."""

    config: UiConfig
    library: LoraLibrary | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    loras: Loras = field(init=False)

    def __post_init__(self):
        if self.library is None:
            self.library = LoraLibrary(self.config.lora_dirs, hash_files=self.config.hash_files)
        self.loras = Loras(library=self.library)

    def scan(self, progress=None):
        with self.lock:
            return self.library.scan(progress=progress)

    def choices(self) -> list[str]:
        """Library keys (``sub/stem``) for dropdowns, in library order."""
        return [e.key for e in self.library.entries]

    def path_of(self, key_or_path: str) -> str:
        """A library key, or else an existing path typed by the user."""
        text = (key_or_path or "").strip()
        if not text:
            raise ToolError("no LoRA chosen")
        for e in self.library.entries:
            if e.key == text:
                return e.path
        if os.path.exists(text):
            return text
        return self.library.resolve(text).path

    def output_path(self, name: str, ext: str = ".safetensors") -> str:
        """``name`` in the output folder (a bare name gets ``ext``); an absolute path is taken as is."""
        name = (name or "").strip()
        if not name:
            raise ToolError("no output name given")
        path = name if os.path.isabs(name) else os.path.join(self.config.out_dir, name)
        if ext and not os.path.splitext(path)[1]:
            path += ext
        return path
