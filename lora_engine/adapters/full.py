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
    bias_field, bias_scaled = "diff_b", False  # Δb = diff_b, unscaled

    def check(self) -> None:
        pass

    def natural_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def delta(self, base: torch.Tensor) -> Delta:
        return Delta(fit(self.scale * f32(self.diff), base.shape, "full"), self.bias_delta())
