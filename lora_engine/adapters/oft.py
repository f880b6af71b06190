"""Orthogonal fine-tuning: Diag-OFT (``oft_blocks`` 3-D, old ``oft_diag``) and BOFT (4-D).

Cayley transform per b×b block: Q = B − Bᵀ; if the constraint c = α·o > 0 and ‖Q‖_F > c,
Q ← Q·c/‖Q‖_F; R = (I + Q)(I − Q)⁻¹. Old ``oft_diag`` files store R itself.
Diag-OFT: W'_k = R_kᵀ W_k on each group k of b output rows.
BOFT (m stages): stage i permutes rows in butterfly order with stride 2^i·b/2, applies the
block-diagonal R_i (W ← R W per block), and permutes back.
Optional ``rescale`` (o,1,…): W' ← rescale ⊙ W'. ΔW = W' − W (strength is linear on it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdapterBase, Delta, f32


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I+Q)(I−Q)⁻¹ with Q = B − Bᵀ, norm-clamped to ``constraint`` when > 0 (fp64 solve)."""
    b = blocks.to(torch.float64)
    q = b - b.transpose(-1, -2)
    if constraint > 0:
        qn = torch.linalg.norm(q) + 1e-8
        if qn > constraint:
            q = q * (constraint / qn)
    eye = torch.eye(b.shape[-1], dtype=torch.float64).expand_as(q)
    return ((eye + q) @ torch.linalg.inv(eye - q)).to(torch.float32)


def _butterfly(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Apply the BOFT stages r (m, n, b, b) to the rows of w (o, ...)."""
    m, _, b, _ = r.shape
    half = b // 2
    for i in range(m):
        k = (2 ** i) * half
        # rows (c, g=2, k) -> (c, k, g): pairs rows that are k apart, then group into b-blocks
        x = w.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("nij,nj...->ni...", r[i], x)
        w = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return w


@dataclass(frozen=True)
class OFT(AdapterBase):
    blocks: torch.Tensor  # (n, b, b) diag-OFT, (m, n, b, b) BOFT, or R itself when is_rotation
    constraint_alpha: float
    rescale: torch.Tensor | None = None
    is_rotation: bool = False  # old "oft_diag" files
    kind = "oft"

    def check(self) -> None:
        if self.blocks.ndim not in (3, 4):
            raise ValueError(f"oft blocks {list(self.blocks.shape)}: expected (n, b, b) or (m, n, b, b)")
        if self.blocks.shape[-1] != self.blocks.shape[-2]:
            raise ValueError(f"oft blocks {list(self.blocks.shape)} are not square")

    @property
    def scale(self) -> float:
        """A rotation has no scale of its own (α constrains the blocks, see ``rotation``)."""
        return 1.0

    def layer_widths(self) -> tuple[int | None, int | None]:
        return int(self.blocks.shape[-3] * self.blocks.shape[-1]), None  # rotations of n·b output rows

    def misfit(self, shape: tuple[int, ...]) -> str | None:
        if self.blocks.shape[-3] * self.blocks.shape[-1] != shape[0]:  # n blocks of b rows (each BOFT stage too)
            return f"oft blocks {list(self.blocks.shape)} vs weight {list(shape)}"
        return None

    @property
    def is_butterfly(self) -> bool:
        return self.blocks.ndim == 4

    def rotation(self, out_dim: int) -> torch.Tensor:
        if self.is_rotation:
            return f32(self.blocks)
        return cayley(self.blocks, self.constraint_alpha * out_dim)

    def delta(self, base: torch.Tensor) -> Delta:
        o = base.shape[0]
        w = f32(base)
        r = self.rotation(o)
        if self.is_butterfly:
            new = _butterfly(w, r)
        else:
            n, b, _ = r.shape
            if n * b != o:
                raise ValueError(f"oft: {n} blocks of {b} do not cover {o} output rows")
            new = torch.einsum("knm,kn...->km...", r, w.reshape(n, b, *w.shape[1:])).reshape(w.shape)
        if self.rescale is not None:
            new = f32(self.rescale).reshape(o, *([1] * (w.ndim - 1))) * new
        return Delta(new - w)
