"""What the web UI pages share: the folders, the library, the model, and the path rule.

Pages receive one :class:`UiContext`; a host (the standalone server, the A1111 tab) builds it from
its own settings. Nothing here imports gradio, so it is tested without it.

Every path a browser sends goes through one of ``lora_path`` / ``model_path`` / ``dataset_path`` /
``output_path``: with ``config.confine`` (the default) they are names inside the configured folders
(:mod:`lora_engine.library.index.confine`), refused before any file is opened; existing outputs are
replaced only when the server allows it (``config.allow_overwrite``), whatever the browser asks.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from ...errors import NameResolutionError, PathRefusedError, ToolError
from ...library import confine
from ...library.index import LoraEntry, LoraLibrary
from ...loras import Loras

DEMO = "demo"


@dataclass(frozen=True)
class UiConfig:
    """``lora_dirs``: folders shown in the Library; ``output_dir``: where the tools write (default:
    the first LoRA folder); ``model``: ``"demo"``, a demo base file, a diffusers folder, or None
    (Generate disabled); ``model_dirs``: where checkpoints typed into Tools/Train may come from;
    ``dataset_dirs``: where training image folders may come from; ``confine=False`` takes typed
    paths as they are (a host whose own pages already read any path, e.g. A1111's tabs)."""

    lora_dirs: tuple[str, ...]
    output_dir: str | None = None
    model: str | None = None
    hash_files: bool = True
    model_dirs: tuple[str, ...] = ()
    dataset_dirs: tuple[str, ...] = ()
    confine: bool = True
    allow_overwrite: bool = False

    @property
    def out_dir(self) -> str:
        return os.path.abspath(self.output_dir or (self.lora_dirs[0] if self.lora_dirs else "."))


def _file_or_folder(path: str, text: str, what: str) -> str:
    """Files must be ``.safetensors`` (checked by name, before opening); folders pass."""
    if os.path.isfile(path) and not path.lower().endswith(".safetensors"):
        raise PathRefusedError(f"{what} {text!r} refused: not a .safetensors file")
    return path


@dataclass
class UiContext:
    """``library``: a host's own :class:`LoraLibrary` (A1111 keeps one), else one over ``config.lora_dirs``;
    ``loras``: names → parsed files → stack entries over that library (what Generate applies)."""

    config: UiConfig
    library: LoraLibrary | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    loras: Loras = field(init=False)
    _generate: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.library is None:
            self.library = LoraLibrary(self.config.lora_dirs, hash_files=self.config.hash_files,
                                       within_folders=self.config.confine)
        self.loras = Loras(library=self.library)

    def scan(self, progress=None):
        with self.lock:
            return self.library.scan(progress=progress)

    def refresh(self) -> None:
        """A quick rescan for a page that opens, skipped while a scan or a grid holds the library."""
        if self.lock.acquire(blocking=False):
            try:
                self.library.scan()
            finally:
                self.lock.release()

    def choices(self) -> list[str]:
        """Library keys (``sub/stem``) for dropdowns, in library order."""
        return [e.key for e in self.library.entries]

    def default_choice(self, current: str | None = None) -> str | None:
        """``current`` while it is still listed, else the first readable file (never an unreadable one)."""
        keys = self.choices()
        if current in keys:
            return current
        return next((e.key for e in self.library.entries if not e.unreadable), None)

    def entry(self, key: str) -> LoraEntry | None:
        return next((e for e in self.library.entries if e.key == key), None)

    def generate_session(self):
        """The one model session (Generate page and Library previews share the loaded model)."""
        with self.lock:
            if self._generate is None:
                from .sweep import GenerateSession

                self._generate = GenerateSession(self)
            return self._generate

    # ---- paths from the browser ----

    def folders_note(self, kind: str) -> str:
        """`` (in FOLDER, …)``: a label tail naming where a ``model`` / ``dataset`` / ``output`` field
        reads or writes; empty for a host whose pages take paths as they are."""
        c = self.config
        if not c.confine:
            return ""
        folders = {"model": (*c.model_dirs, c.out_dir), "dataset": c.dataset_dirs, "output": (c.out_dir,)}[kind]
        return f" (in {', '.join(folders) or 'no configured folder'})"

    def lora_path(self, key_or_path: str) -> str:
        """A library name (key, stem, alias, hash), or a ``.safetensors`` file / PEFT folder under a
        LoRA folder or the output folder."""
        text = (key_or_path or "").strip()
        if not text:
            raise ToolError("no LoRA chosen")
        hit = self.entry(text)
        if hit is not None:
            return hit.path
        if not self.config.confine:
            return text if os.path.exists(text) else self.library.resolve(text).path
        folders = (*self.config.lora_dirs, self.config.out_dir)
        confine.relative(text, "LoRA")  # refuses absolute / '..' / drive / NUL before any lookup
        try:
            return self.library.resolve(text).path
        except NameResolutionError as e:
            path = confine.find_path(text, folders, "LoRA")
            if path is None:
                raise e from None
        return _file_or_folder(path, text, "LoRA")

    def model_path(self, text: str) -> str:
        """A checkpoint: ``.safetensors`` file or model folder under the model folders or the output
        folder, or the configured model itself."""
        text = (text or "").strip()
        if not text:
            raise ToolError("no model given")
        if not self.config.confine or text in (DEMO, self.config.model):
            return text
        folders = (*self.config.model_dirs, self.config.out_dir)
        return _file_or_folder(confine.read_path(text, folders, "model"), text, "model")

    def dataset_path(self, text: str) -> str:
        """A training image folder under the dataset folders."""
        text = (text or "").strip()
        if not self.config.confine:
            return text
        path = confine.read_path(text, self.config.dataset_dirs, "image folder")
        if not os.path.isdir(path):
            raise PathRefusedError(f"image folder {text!r} refused: not a folder")
        return path

    def output_path(self, name: str, ext: str = ".safetensors", overwrite: bool = False) -> str:
        """``name`` in the output folder (a bare name gets ``ext``; no other extension than
        ``.safetensors``). An existing path is refused unless ``overwrite`` was asked for and the server
        allows replacing files."""
        name = (name or "").strip()
        if not name:
            raise ToolError("no output name given")
        if ext and not os.path.splitext(name)[1]:
            name += ext
        if self.config.confine:
            given = os.path.splitext(name)[1].lower()
            if given and given != ".safetensors":  # never a sidecar, preview or cache file of the library
                raise PathRefusedError(f"output name {name!r} refused: write .safetensors files (or a folder name "
                                       "without an extension)")
            path = confine.write_path(name, self.config.out_dir, "output name")
        else:
            path = name if os.path.isabs(name) else os.path.join(self.config.out_dir, name)
        if os.path.lexists(path) and not self.may_overwrite(overwrite):
            rule = "tick overwrite to replace it" if self.may_overwrite(True) else \
                "this server does not replace files; choose another name"
            raise ToolError(f"{path}: exists ({rule})")
        return path

    def may_overwrite(self, asked) -> bool:
        """The server's rule: replace only when asked and allowed (an unconfined host's page decides)."""
        return bool(asked) and (self.config.allow_overwrite or not self.config.confine)
