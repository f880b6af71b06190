"""LoHa (LyCORIS ``hada_*``): Hadamard product of two low-rank products.

ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b), reshaped to W; w?a (o,r), w?b (r, i·k·k).
Tucker (``hada_t1``/``hada_t2``; w?a (r,o), w?b (r,i)):
ΔW_j[p,q,...] = Σ_ab t_j[a,b,...]·w_ja[a,p]·w_jb[b,q],   ΔW = s · ΔW_1 ⊙ ΔW_2.
s = α/r with r = w1b.shape[0].

Computed as m·ΔW = (w1a @ w1b) ⊙ ((m·s·w2a) @ w2b) (Tucker: m·s on t2): the scalar rides on a small
factor, the first product is written straight into the destination and the Hadamard product is taken
in place there, so a full-size matrix is written three times (two products, one multiply) and only
one full-size temporary is allocated.
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

    def _factor(self, a, b, t, c: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
        """c·(a @ b) (Tucker: rebuilt from c·t), c applied to the small factor; into ``out`` (a contiguous
        fp32 buffer of the product's size) when given and the plain product fits it."""
        if t is not None:
            return cp_rebuild(f32(t) * c if c != 1.0 else f32(t), f32(a), f32(b))
        a, b = f32(a) * c if c != 1.0 else f32(a), f32(b).reshape(b.shape[0], -1)
        if out is not None and a.ndim == 2 and out.numel() == a.shape[0] * b.shape[1]:
            return torch.mm(a, b, out=out.view(a.shape[0], b.shape[1]))
        return a @ b

    def scaled_delta(self, base: torch.Tensor, factor: float, out: torch.Tensor | None = None) -> torch.Tensor:
        m2 = self._factor(self.w2a, self.w2b, self.t2, self.scale * factor)  # first: a failure writes nothing
        if out is not None and out.numel() != m2.numel():
            raise ValueError(f"loha: delta of shape {list(m2.shape)} does not fit target {list(base.shape)}")
        m1 = self._factor(self.w1a, self.w1b, self.t1, out=out)
        return fit(m1.mul_(m2), base.shape, "loha")

    def delta(self, base: torch.Tensor) -> Delta:
        return Delta(self.scaled_delta(base, 1.0))
