"""Full / native fine-tune (LyCORIS ``diff``/``diff_b``): ΔW = s·diff, Δb = diff_b (s = 1 unless a ``scale`` key)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdapterBase, Delta, f32, fit


@dataclass(frozen=True)
class Full(AdapterBase):
    diff: torch.Tensor
    diff_b: torch.Tensor | None = None
    scale: float = 1.0
    kind = "full"

    def check(self) -> None:
        pass

    def natural_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    @property
    def has_bias_delta(self) -> bool:
        return self.diff_b is not None

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.diff_b is None else f32(self.diff_b)

    def delta(self, base: torch.Tensor) -> Delta:
        return Delta(fit(self.scale * f32(self.diff), base.shape, "full"), self.bias_delta())
