"""One exception hierarchy. Every message names the file (or tag) and the cause in one line."""
from __future__ import annotations

import os


class LoraEngineError(Exception):
    """Base of every error lora-engine raises on purpose."""


class LoraFileError(LoraEngineError):
    """A LoRA file could not be read or interpreted."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        where = self.path if self.path is not None else "<memory>"
        super().__init__(f"{where}: {problem}")


class UnsafeFileError(LoraFileError):
    """A pickle that would execute code, or anything else we refuse to open."""


class AdapterShapeError(LoraFileError):
    """Tensors of one module do not chain (e.g. up/down ranks differ) or do not fit the target."""


class PatchError(LoraEngineError):
    """A stack could not be put on the model (an adapter's math failed on its weight); the model was
    left exactly as it was before the attempt."""


class NameResolutionError(LoraEngineError):
    """A LoRA name could not be resolved to exactly one file in the library."""


class PathRefusedError(LoraEngineError):
    """A typed path that would leave the folders a front-end may read or write (absolute, ``..``, a link out)."""


class ToolError(LoraEngineError):
    """A LoRA tool (merge, resize, extract, convert, bake) cannot do what was asked; the message says why."""


class OutputExistsError(ToolError):
    """An output file or folder exists and replacing it was not asked for (the one rule of every writing command)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        super().__init__(f"{self.path} exists; pass --overwrite to replace it")


class OperationCancelled(LoraEngineError):
    """A long operation was cancelled by its caller (cancel flag set or progress callback raised it)."""


class DatasetError(LoraEngineError):
    """A training dataset cannot be used (empty, unreadable, no captions, images too small)."""


class TrainingError(LoraEngineError):
    """Training cannot start or continue (bad settings, persistent NaN/Inf, incompatible resume state)."""


class ModelFolderError(LoraEngineError):
    """A model folder (e.g. a diffusers pipeline folder) is missing or cannot be used."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
