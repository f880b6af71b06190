"""LoKr (LyCORIS ``lokr_*``): Kronecker product.

ΔW = s · kron(W1, W2), W1 = lokr_w1 or w1a@w1b (p,m); W2 = lokr_w2 or w2a@w2b (q, n[,k,k])
or the Tucker rebuild Σ_ab t2[a,b,...]·w2a[a,q]·w2b[b,n]. For convs W1 gets two unit
kernel dims so the kernel lives in W2. o = p·q, i = m·n.
s = α/r with r from the decomposed factor (w2b.shape[0], else w1b.shape[0]);
when neither factor is decomposed, α is ignored and s = 1 (LyCORIS and A1111 alike).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import AdapterBase, Delta, cp_rebuild, f32, fit


@dataclass(frozen=True)
class LoKr(AdapterBase):
    w1: torch.Tensor | None
    w1a: torch.Tensor | None
    w1b: torch.Tensor | None
    w2: torch.Tensor | None
    w2a: torch.Tensor | None
    w2b: torch.Tensor | None
    scale: float
    t2: torch.Tensor | None = None
    kind = "lokr"

    @property
    def rank(self) -> int | None:
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        if self.w1b is not None:
            return int(self.w1b.shape[0])
        return None

    def check(self) -> None:
        if self.w1 is None and (self.w1a is None or self.w1b is None):
            raise ValueError("needs lokr_w1 or lokr_w1_a + lokr_w1_b")
        if self.w2 is None and (self.w2a is None or self.w2b is None):
            raise ValueError("needs lokr_w2 or lokr_w2_a + lokr_w2_b")
        if self.w1 is None and self.w1a.shape[1] != self.w1b.shape[0]:
            raise ValueError(f"lokr_w1_a {list(self.w1a.shape)} and lokr_w1_b {list(self.w1b.shape)} do not chain")
        if self.w2 is None:
            if self.t2 is not None:
                chain = self.t2.shape[0] == self.w2a.shape[0] and self.t2.shape[1] == self.w2b.shape[0]
            else:
                chain = self.w2a.shape[1] == self.w2b.shape[0]
            if not chain:
                raise ValueError(f"lokr_w2_a {list(self.w2a.shape)} and lokr_w2_b {list(self.w2b.shape)} do not chain"
                                 + (f" through lokr_t2 {list(self.t2.shape)}" if self.t2 is not None else ""))

    def factor1(self) -> torch.Tensor:
        return f32(self.w1) if self.w1 is not None else f32(self.w1a) @ f32(self.w1b)

    def factor2(self) -> torch.Tensor:
        if self.w2 is not None:
            return f32(self.w2)
        if self.t2 is not None:
            return cp_rebuild(f32(self.t2), f32(self.w2a), f32(self.w2b))
        return f32(self.w2a) @ f32(self.w2b).reshape(self.w2b.shape[0], -1)

    def _factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of :meth:`factor1` and :meth:`factor2`, from the stored shapes alone (a file's small factors
        can describe a product far too large to build just to learn its shape)."""
        s1 = tuple(self.w1.shape) if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])
        if self.w2 is not None:
            s2 = tuple(self.w2.shape)
        elif self.t2 is not None:
            s2 = (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])
        else:
            s2 = (self.w2a.shape[0], math.prod(self.w2b.shape[1:]))
        return s1, s2

    def natural_shape(self) -> tuple[int, ...]:
        s1, s2 = self._factor_shapes()
        return (s1[0] * s2[0], s1[1] * s2[1], *s2[2:])

    def dense_for(self, shape: tuple[int, ...]) -> torch.Tensor:
        w1, w2 = self.factor1(), self.factor2()
        if len(shape) == 4 and w2.ndim == 2 and w1.shape[1] * w2.shape[1] != shape[1]:
            # w2 flattened over (n·k·k): restore its kernel dims
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        while w1.ndim < w2.ndim:
            w1 = w1.unsqueeze(-1)
        return self.scale * torch.kron(w1, w2)

    def delta(self, base: torch.Tensor) -> Delta:
        return Delta(fit(self.dense_for(tuple(base.shape)), base.shape, "lokr"))
