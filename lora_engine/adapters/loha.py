"""LoHa (LyCORIS ``hada_*``): Hadamard product of two low-rank products.

ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b), reshaped to W; w?a (o,r), w?b (r, i·k·k).
Tucker (``hada_t1``/``hada_t2``; w?a (r,o), w?b (r,i)):
ΔW_j[p,q,...] = Σ_ab t_j[a,b,...]·w_ja[a,p]·w_jb[b,q],   ΔW = s · ΔW_1 ⊙ ΔW_2.
s = α/r with r = w1b.shape[0].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdapterBase, Delta, cp_rebuild, f32, fit


@dataclass(frozen=True)
class LoHa(AdapterBase):
    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    scale: float
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind = "loha"

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    def check(self) -> None:
        if self.t1 is None:
            if self.w1a.shape[1] != self.w1b.shape[0] or self.w2a.shape[1] != self.w2b.shape[0]:
                raise ValueError("hada_w?_a and hada_w?_b do not chain")
            if self.w1a.shape[0] != self.w2a.shape[0] or self.w1b.shape[1:].numel() != self.w2b.shape[1:].numel():
                raise ValueError("the two Hadamard factors have different shapes")

    def natural_shape(self) -> tuple[int, ...]:
        if self.t1 is not None:
            return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])
        return (self.w1a.shape[0], *self.w1b.shape[1:])

    def _factor(self, a, b, t) -> torch.Tensor:
        if t is not None:
            return cp_rebuild(f32(t), f32(a), f32(b))
        return f32(a) @ f32(b).reshape(b.shape[0], -1)

    def dense(self) -> torch.Tensor:
        return self.scale * self._factor(self.w1a, self.w1b, self.t1) * self._factor(self.w2a, self.w2b, self.t2)

    def delta(self, base: torch.Tensor) -> Delta:
        return Delta(fit(self.dense(), base.shape, "loha"))
