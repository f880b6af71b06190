"""Legacy ``.pt``/``.ckpt``/``.bin`` LoRAs, read only through ``torch.load(weights_only=True)``.

A full unpickle can execute arbitrary code; the restricted unpickler only
rebuilds tensors and plain containers, and refuses anything else. When it refuses,
the pickle's opcodes are *listed* (``pickletools.genops``, which never executes
anything) to tell a code-calling pickle (:class:`UnsafeFileError`) from a corrupt
one (:class:`LoraFileError`).
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile

import torch

from ..errors import LoraFileError, UnsafeFileError
from .safetensors_file import DTYPES

_DENSE_DTYPES = frozenset(DTYPES.values())  # what a safetensors file can hold, the adapters can read

# A pickle imports what it calls through these opcodes; torch's own rebuild helpers are expected.
_IMPORTING_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST"}
_EXPECTED_MODULES = ("torch", "collections")
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running",
                      "(1)", "(2)")


def _reason(e: BaseException) -> str:
    """The informative line of torch's (long, multi-line) error message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for k, ln in enumerate(lines):  # "WeightsUnpickler error: <why>", the why sometimes on the next line
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            if rest or k + 1 < len(lines):
                return (rest or lines[k + 1]).split(". ")[0][:160]
    useful = [ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)]
    return (useful or lines or [type(e).__name__])[0].split(". ")[0][:160]


def _calls_code(path: str) -> str | None:
    """``module.name`` of the first non-torch import in a raw pickle, listed without executing it."""
    if zipfile.is_zipfile(path):
        return None  # torch's zip format: its unpickler names the GLOBAL itself
    strings: list[str] = []
    try:
        with open(path, "rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if isinstance(arg, str):
                    strings = (strings + [arg])[-2:]
                if op.name not in _IMPORTING_OPCODES:
                    continue
                target = ".".join(strings) if op.name == "STACK_GLOBAL" else str(arg).replace(" ", ".")
                if not target.startswith(_EXPECTED_MODULES):
                    return target
    except Exception:  # noqa: BLE001 - corrupt stream: stop listing, nothing was executed
        return None
    return None


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = _reason(e)
        m = re.search(r"\bGLOBAL ([\w.]+)", str(e))  # torch names the global it refused
        what = m.group(1) if m else _calls_code(path)
        if what:
            raise UnsafeFileError(
                path, f"refused: the pickle would import and call {what} (code execution); only plain tensors are loaded,"
                " convert it to safetensors from a trusted copy"
            ) from None
        raise LoraFileError(path, f"not a readable tensor checkpoint: {why}") from None
    except Exception as e:  # noqa: BLE001 - any corruption inside torch.load is one clear error, no traceback
        raise LoraFileError(path, f"cannot read legacy checkpoint (corrupt or truncated): {_reason(e)}") from None


def read_pickled(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise LoraFileError(path, "empty file (0 bytes)")
    obj = _load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraFileError(path, f"legacy file holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise LoraFileError(path, "legacy file holds no tensors")
    for k, t in tensors.items():
        if t.layout != torch.strided or t.is_nested or t.is_meta or t.dtype not in _DENSE_DTYPES:
            kind = "nested" if t.is_nested else "meta" if t.is_meta else f"{t.layout}, {t.dtype}".replace("torch.", "")
            raise LoraFileError(path, f"tensor {k[:80]!r} is {kind}: only dense real-valued tensors are read")
    return tensors, {}
