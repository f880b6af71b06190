"""LoKr (LyCORIS ``lokr_*``): Kronecker product.

ΔW = s · kron(W1, W2), W1 = lokr_w1 or w1a@w1b (p,m); W2 = lokr_w2 or w2a@w2b (q, n[,k,k])
or the Tucker rebuild Σ_ab t2[a,b,...]·w2a[a,q]·w2b[b,n]. For convs W1 gets two unit
kernel dims so the kernel lives in W2. o = p·q, i = m·n.
s = α/r with r from the decomposed factor (w2b.shape[0], else w1b.shape[0]);
when neither factor is decomposed, α is ignored and s = 1 (LyCORIS and A1111 alike).

With W1 two-dimensional (as every writer stores it) the Kronecker product is one broadcast product
written straight into the destination: viewing ΔW (p·q, m·n[·k·k]) as (p, q, m, n[·k·k]),
m·ΔW[a, i, b, j] = (m·s·W1[a, b]) · W2[i, j] — the scalar on the small W1, one full-size write.
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

    def scaled_delta(self, base: torch.Tensor, factor: float, out: torch.Tensor | None = None) -> torch.Tensor:
        w1, w2 = self.factor1(), self.factor2()
        c = self.scale * factor
        if w1.ndim > 2 and math.prod(w1.shape[2:]) == 1:  # (p, m, 1, 1): the kernel lives in W2
            w1 = w1.reshape(w1.shape[0], w1.shape[1])
        elif w1.ndim == 1:
            w1 = w1.unsqueeze(-1)
        if w1.ndim != 2:  # a W1 with kernel dims (no writer stores one): the general product
            d = fit(c * self._kron(w1, w2, tuple(base.shape)), base.shape, "lokr")
            return d if out is None else out.copy_(d)
        (p, m), q = w1.shape, w2.shape[0]
        rest = w2.numel() // q  # n, or n·k·k: W2's kernel dims follow its input dim, as in ΔW
        if p * q * m * rest != base.numel():
            raise ValueError(f"lokr: delta of shape {list(self.natural_shape())} does not fit target "
                             f"{list(base.shape)}")
        if out is None:
            out = torch.empty(base.shape, dtype=w2.dtype, device=w2.device)
        torch.mul((w1 * c).view(p, 1, m, 1), w2.reshape(q, 1, rest), out=out.view(p, q, m, rest))
        return out

    @staticmethod
    def _kron(w1: torch.Tensor, w2: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 4 and w2.ndim == 2 and w1.shape[1] * w2.shape[1] != shape[1]:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])  # w2 flattened over (n·k·k): its kernel dims back
        while w1.ndim < w2.ndim:
            w1 = w1.unsqueeze(-1)
        return torch.kron(w1, w2)

    def delta(self, base: torch.Tensor) -> Delta:
        return Delta(self.scaled_delta(base, 1.0))
