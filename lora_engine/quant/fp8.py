"""fp8 weights: plain ``float8_e4m3fn`` / ``float8_e5m2`` and ComfyUI/Forge "scaled fp8".

Plain fp8 (ComfyUI ``weight_dtype`` fp8, A1111's FP8 weight option, Forge fp8): W = fp32(q).
Scaled fp8 (ComfyUI's ``scaled_fp8_ops``): the checkpoint carries a ``scaled_fp8`` marker tensor (its
dtype names the fp8 type; an fp32 marker means e4m3fn) and every Linear a ``scale_weight`` (optionally
``scale_input``; later ComfyUI versions call the per-layer scale ``weight_scale``):
    W = fp32(q) · scale_weight          requant: q = RN_fp8(W / scale_weight), the scale kept
Requantization rounds to nearest (torch's cast, round-half-even); ComfyUI rounds stochastically.
"""
from __future__ import annotations

import torch

from .base import QuantWeight, row_slice

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_NAMES = ("scale_weight", "weight_scale")


def is_fp8(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in FP8


def scaled_fp8_dtype(state_dict: dict, prefix: str = "") -> torch.dtype | None:
    """The fp8 type a checkpoint's ``{prefix}scaled_fp8`` marker announces (None: no marker)."""
    marker = state_dict.get(f"{prefix}scaled_fp8")
    if marker is None:
        return None
    return torch.float8_e4m3fn if marker.dtype == torch.float32 else marker.dtype


def weight_scale(owner: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The per-layer scale of a scaled-fp8 ``weight`` (None for plain fp8)."""
    if name != "weight":
        return None
    for attr in SCALE_NAMES:
        s = getattr(owner, attr, None)
        if isinstance(s, torch.Tensor):
            return s
    return None


class Fp8Weight(QuantWeight):
    @property
    def format(self) -> str:
        return "fp8 e4m3fn" if self.param.dtype == torch.float8_e4m3fn else "fp8 e5m2"

    def stored(self, rows=None):
        return row_slice(self.param.detach(), rows).clone()

    def put(self, stored, rows=None) -> None:
        row_slice(self.param.detach(), rows).copy_(stored)

    def dequant_stored(self, stored, rows=None) -> torch.Tensor:
        return stored.float()

    def requant(self, w: torch.Tensor, rows=None) -> None:
        row_slice(self.param.detach(), rows).copy_(w)  # copy_ rounds to nearest like .to(fp8)


class ScaledFp8Weight(Fp8Weight):
    """fp8 storage times a per-tensor (or per-row, broadcasting) fp32 scale."""

    @property
    def scale(self) -> torch.Tensor:
        return weight_scale(self.owner, self.name)

    @property
    def format(self) -> str:
        return "scaled " + super().format

    def _scale_rows(self, rows):
        s = self.scale.detach()
        return row_slice(s, rows) if rows is not None and s.ndim > 0 and s.shape[0] == self.shape[0] else s

    def stored(self, rows=None):
        return super().stored(rows), self._scale_rows(rows).clone()

    def put(self, stored, rows=None) -> None:
        q, s = stored
        super().put(q, rows)
        self._scale_rows(rows).copy_(s)

    def dequant_stored(self, stored, rows=None) -> torch.Tensor:
        q, s = stored
        s = s.float().to(q.device)
        return q.float() * (s.reshape(-1, *([1] * (q.ndim - 1))) if s.ndim == 1 and q.ndim > 1 else s)

    def requant(self, w: torch.Tensor, rows=None) -> None:
        s = self._scale_rows(rows).float().to(w.device)
        s = s.reshape(-1, *([1] * (w.ndim - 1))) if s.ndim == 1 and w.ndim > 1 else s
        super().requant(w / s, rows)
