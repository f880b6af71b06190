"""Model checkpoints as the tools read them: a single-file safetensors checkpoint (ldm/sgm as A1111
and ComfyUI load it, or any flat state dict), or a diffusers folder (``unet/`` or ``transformer/`` (Flux, SD3),
``text_encoder/``, ``text_encoder_2/``, ``text_encoder_3/`` with ``*.safetensors`` weights, possibly sharded
(``-00001-of-00003`` with an index json, which names the same keys in the same shards after a bake) or with
variants like ``fp16``).

Keys are seen under one namespace: a single file's own keys, or ``<component>.<key>`` for a
diffusers folder (the prefixes ``build_keymap`` recognises). Headers are read up front; tensor
bytes are read on demand with plain file reads (``read``) so nothing stays mapped.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from ..errors import LoraFileError
from .safetensors_file import SafetensorsFile, TensorInfo

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_WEIGHT_RE = re.compile(r"^(?P<stem>[^.]+?)(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:-\d+-of-\d+)?\.safetensors$")
CHUNK = 16 << 20


@dataclass(frozen=True)
class Part:
    """One safetensors file of a checkpoint: its keys appear as ``prefix + key``."""

    rel: str  # path relative to the checkpoint root ("" for a single file)
    prefix: str
    file: SafetensorsFile


class Checkpoint:
    def __init__(self, path: str, kind: str, parts: list[Part]):
        self.path, self.kind, self.parts = path, kind, parts
        self._where: dict[str, tuple[Part, str]] = {}
        for part in parts:
            for k in part.file.info:
                self._where[part.prefix + k] = (part, k)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: p.file.info[rk].shape for k, (p, rk) in self._where.items()}

    def info(self, key: str) -> TensorInfo:
        part, rk = self._where[key]
        return part.file.info[rk]

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def read(self, key: str) -> torch.Tensor:
        """A fresh tensor with the stored bytes (one file read; no memory map kept)."""
        part, rk = self._where[key]
        return read_tensor(part.file.path, part.file.info[rk])


def read_tensor(path: str, ti: TensorInfo) -> torch.Tensor:
    t = torch.empty(ti.shape, dtype=ti.dtype)
    if t.numel() == 0:
        return t
    buf = t.reshape(-1).view(torch.uint8).numpy()
    with open(path, "rb", buffering=0) as fh:
        fh.seek(ti.begin)
        got = fh.readinto(buf)
    if got != ti.end - ti.begin:
        raise LoraFileError(path, f"short read at byte {ti.begin}: {got} of {ti.end - ti.begin} bytes")
    return t


def copy_bytes(src_path: str, begin: int, end: int, out) -> None:
    """Copy bytes [begin, end) of ``src_path`` to the open file ``out`` in bounded chunks."""
    with open(src_path, "rb", buffering=0) as fh:
        fh.seek(begin)
        left = end - begin
        while left > 0:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                raise LoraFileError(src_path, f"short read at byte {end - left}")
            out.write(chunk)
            left -= len(chunk)


def variant_of(filename: str) -> str | None:
    """``None`` when not a weights file, else its variant ("" for the default)."""
    m = _WEIGHT_RE.match(filename)
    if not m:
        return None
    return m.group("variant") or ""


def diffusers_weight_files(root: str, variant: str | None = None) -> dict[str, list[str]]:
    """{variant: [relative paths of the components' safetensors files]}."""
    out: dict[str, list[str]] = {}
    for comp in COMPONENTS:
        folder = os.path.join(root, comp)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            v = variant_of(name)
            if v is not None and (variant is None or v == variant):
                out.setdefault(v, []).append(f"{comp}/{name}")
    return out


def is_diffusers_folder(path: str) -> bool:
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "model_index.json"))
                                    or any(os.path.isdir(os.path.join(path, c)) for c in COMPONENTS))


def open_checkpoint(path: str | os.PathLike, variant: str = "") -> Checkpoint:
    """Open a single-file checkpoint or one variant of a diffusers folder (default: no variant)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not is_diffusers_folder(path):
            raise LoraFileError(path, "folder is not a diffusers model (no unet/, transformer/ or text_encoder/)")
        files = diffusers_weight_files(path, variant).get(variant, [])
        if not files:
            raise LoraFileError(path, f"no {variant or 'default'}-variant .safetensors weights under unet/, transformer/ or text_encoder*/")
        parts = [Part(rel, rel.split("/")[0] + ".", SafetensorsFile(os.path.join(path, rel))) for rel in files]
        return Checkpoint(path, "diffusers", parts)
    if not path.lower().endswith(".safetensors"):
        raise LoraFileError(path, "only .safetensors checkpoints are read (pickled .ckpt files can run code)")
    return Checkpoint(path, "single", [Part("", "", SafetensorsFile(path))])
