"""GLoRA (LyCORIS ``a1/a2/b1/b2``): a weight-dependent plus an additive low-rank term.

Current layout (LyCORIS ≥ 3.0): a1 (i,r)·a2 (r,i) act on input channels, b1 (o,r)·b2 (r,i):
    ΔW = s · (W @ (a1 @ a2) + b1 @ b2)
Old layout (< 3.0, A1111's loader) stores the transposed roles: a1 (r,i), a2 (i,r), b1 (r,i), b2 (o,r):
    ΔW = s · (W @ (a2 @ a1) + b2 @ b1)
For convs the A-term acts on the input-channel axis of every kernel tap and the B-term is
flattened (o, i·k·k). Layout is detected from shapes against the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdapterBase, Delta, f32, fit


def _mat(t: torch.Tensor) -> torch.Tensor:
    return f32(t).reshape(t.shape[0], -1)


@dataclass(frozen=True)
class GLoRA(AdapterBase):
    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    scale: float
    kind = "glora"

    def check(self) -> None:
        pass

    def layer_widths(self) -> tuple[int | None, int | None]:
        # a1 (i, r), b1 (o, r) [LyCORIS >= 3]; a1 (r, i), b2 (o, r) [older]: r is the small side
        current = self.a1.shape[1] <= self.a1.shape[0]
        return int((self.b1 if current else self.b2).shape[0]), int(max(self.a1.shape[0], self.a1.shape[1]))

    def _is_old_layout(self, out_dim: int) -> bool:
        return self.b2.shape[0] == out_dim and self.b1.shape[0] != out_dim

    def delta(self, base: torch.Tensor) -> Delta:
        o = base.shape[0]
        a1, a2, b1, b2 = _mat(self.a1), _mat(self.a2), _mat(self.b1), _mat(self.b2)
        if self._is_old_layout(o):
            a_in, b_term = a2 @ a1, b2 @ b1
        else:
            a_in, b_term = a1 @ a2, b1 @ b2
        w = f32(base)
        w_a = torch.einsum("oj...,ji->oi...", w, a_in)
        return Delta(self.scale * (w_a + fit(b_term, base.shape, "glora")))
