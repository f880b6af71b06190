"""IA3 (LyCORIS ``weight`` + ``on_input``): learned per-channel rescale.

W' = W ⊙ (1 + w): w scales output rows (``on_input`` = 0) or input columns (``on_input`` = 1),
so ΔW = W ⊙ w (broadcast). No α.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdapterBase, Delta, f32


@dataclass(frozen=True)
class IA3(AdapterBase):
    weight: torch.Tensor
    on_input: bool
    scale: float = 1.0
    kind = "ia3"

    def check(self) -> None:
        pass

    def layer_widths(self) -> tuple[int | None, int | None]:
        n = int(self.weight.numel())  # one scale per output row, or per input column with on_input
        return (None, n) if self.on_input else (n, None)

    def misfit(self, shape: tuple[int, ...]) -> str | None:
        n = self.weight.numel()
        return None if n in tuple(shape)[:2] else f"ia3 vector of {n} vs weight {list(shape)}"

    def delta(self, base: torch.Tensor) -> Delta:
        w = f32(self.weight).flatten()
        shape = [1] * base.ndim
        axis = 1 if self.on_input else 0
        if w.numel() != base.shape[axis]:
            raise ValueError(f"ia3 vector of {w.numel()} does not fit axis {axis} of {list(base.shape)}")
        shape[axis] = -1
        return Delta(self.scale * f32(base) * w.reshape(shape))
