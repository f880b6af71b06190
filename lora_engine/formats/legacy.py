"""Legacy ``.pt``/``.ckpt``/``.bin`` LoRAs, read only through ``torch.load(weights_only=True)``.

A full unpickle can execute arbitrary code; the restricted unpickler only
rebuilds tensors and plain containers, and refuses anything else.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import torch

from ..errors import LoraFileError, UnsafeFileError


def read_pickled(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise LoraFileError(path, "empty file (0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeFileError(
            path, f"refused: the pickle wants more than plain tensors ({first[:160]}); convert it to safetensors"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoraFileError(path, f"cannot read legacy checkpoint: {msg[:200]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraFileError(path, f"legacy file holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise LoraFileError(path, "legacy file holds no tensors")
    return tensors, {}
