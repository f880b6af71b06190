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

    def check(self) -> None:
        pass

    def natural_shape(self) -> tuple[int, ...]:
        return tuple(self.w_norm.shape)

    @property
    def has_bias_delta(self) -> bool:
        return self.b_norm is not None

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.b_norm is None else self.scale * f32(self.b_norm)

    def delta(self, base: torch.Tensor) -> Delta:
        return Delta(fit(self.scale * f32(self.w_norm), base.shape, "norm"), self.bias_delta())
