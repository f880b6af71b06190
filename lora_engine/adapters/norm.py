"""Norm layers (LyCORIS ``w_norm``/``b_norm`` on LayerNorm/GroupNorm): Δγ = w_norm, Δβ = b_norm."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdapterBase, Delta, f32, fit


@dataclass(frozen=True)
class Norm(AdapterBase):
    w_norm: torch.Tensor
    b_norm: torch.Tensor | None = None
    scale: float = 1.0
    kind = "norm"
    bias_field = "b_norm"

    def check(self) -> None:
        pass

    def natural_shape(self) -> tuple[int, ...]:
        return tuple(self.w_norm.shape)

    def delta(self, base: torch.Tensor) -> Delta:
        return Delta(fit(self.scale * f32(self.w_norm), base.shape, "norm"), self.bias_delta())
