"""Where LoRA files live: ComfyUI's ``folder_paths`` registry, behind a small seam.

ComfyUI lists LoRAs with ``folder_paths.get_filename_list("loras")`` (paths relative to one of
the ``loras`` roots, with extension and OS separator; the roots come from ``models/loras``,
``output/loras`` and ``extra_model_paths.yaml``) and resolves a listed name with
``folder_paths.get_full_path("loras", name)``. The nodes call only the three functions of
:class:`FolderPaths`; ``folder_paths`` itself is imported on first use, so this module imports
outside ComfyUI. Tests (and scripts) install a :class:`DirectoryFolderPaths` with :func:`use`.
"""
from __future__ import annotations

import os
from typing import Protocol

from lora_engine.errors import LoraFileError

# ComfyUI's supported_pt_extensions for the "loras" folder (matched case-insensitively).
LORA_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")
FOLDER = "loras"


class FolderPaths(Protocol):
    """The part of ComfyUI's ``folder_paths`` module the nodes use (same names and signatures)."""

    def get_filename_list(self, folder_name: str) -> list[str]: ...

    def get_full_path(self, folder_name: str, filename: str) -> str | None: ...

    def get_folder_paths(self, folder_name: str) -> list[str]: ...


class DirectoryFolderPaths:
    """A ``folder_paths`` over plain directories: ``{"loras": [dir, ...]}``, ComfyUI's listing rules
    (recursive, relative names with extension, sorted, first root wins)."""

    def __init__(self, folders: dict[str, list[str]]):
        self.folders = {k: [os.fspath(p) for p in v] for k, v in folders.items()}

    def get_folder_paths(self, folder_name: str) -> list[str]:
        return list(self.folders.get(folder_name, []))

    def get_filename_list(self, folder_name: str) -> list[str]:
        names = set()
        for root in self.get_folder_paths(folder_name):
            for folder, dirs, files in os.walk(root, followlinks=True):
                dirs[:] = [d for d in dirs if d != ".git"]
                for f in files:
                    if f.lower().endswith(LORA_EXTENSIONS):
                        names.add(os.path.relpath(os.path.join(folder, f), root))
        return sorted(names)

    def get_full_path(self, folder_name: str, filename: str) -> str | None:
        rel = os.path.normpath("/" + filename).lstrip("/\\")  # no escaping the roots
        for root in self.get_folder_paths(folder_name):
            p = os.path.join(root, rel)
            if os.path.isfile(p):
                return p
        return None


_installed: FolderPaths | None = None


def use(registry: FolderPaths | None) -> None:
    """Install ``registry`` as the source of LoRA folders (None: back to ComfyUI's ``folder_paths``)."""
    global _installed
    _installed = registry


def registry() -> FolderPaths:
    if _installed is not None:
        return _installed
    import folder_paths  # ComfyUI's module; only importable inside ComfyUI

    return folder_paths


def lora_names() -> list[str]:
    """The names a LoRA combo offers (ComfyUI's own list)."""
    return list(registry().get_filename_list(FOLDER))


def lora_folders() -> list[str]:
    return [p for p in registry().get_folder_paths(FOLDER) if os.path.isdir(p)]


def lora_path(name: str) -> str:
    """Full path of a listed name, or :class:`LoraFileError` naming it."""
    path = registry().get_full_path(FOLDER, name)
    if path is None:
        raise LoraFileError(name, f"not found in the ComfyUI '{FOLDER}' folders")
    return path
