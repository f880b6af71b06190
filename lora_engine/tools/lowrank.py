"""Truncated SVD of a dense delta, rank selection, and dense deltas of a LoRA file's modules.

A delta ΔW (o, i[, kh, kw]) is flattened to M (o, n), n = i·kh·kw, and factored M = U·diag(S)·Vᵀ.
Keeping k ranks: ``up`` = U_k·diag(S_k) (o, k) [→ (o, k, 1, 1) for a conv], ``down`` = V_kᵀ (k, n)
[→ (k, i, kh, kw)], so up@down is the best rank-k approximation (Eckart–Young) and

    ‖M − up@down‖_F² = Σ_{j>k} S_j²,      retained Frobenius fraction = √(Σ_{j≤k} S_j² / Σ_j S_j²).

Rank selection (the criteria of sd-scripts ``resize_lora.py``), each capped at ``max_rank`` and ≥ 1:
  fixed          k = max_rank
  sv_ratio p     k = #{j : S_j > S_max / p}
  sv_cumulative  k = smallest k with Σ_{j≤k} S_j / Σ_j S_j ≥ p
  sv_fro         k = smallest k with √(Σ_{j≤k} S_j² / Σ_j S_j²) ≥ p
(sd-scripts also never keeps all min(o, n) values; we do when the criterion asks for it.)
No quantile clamping of the factors is applied, so the error is exactly the discarded energy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import COMPUTE
from ..errors import ToolError

METHODS = ("fixed", "sv_ratio", "sv_cumulative", "sv_fro")
# Adapter kinds whose delta does not depend on the base weight's values (so a LoRA can hold it).
BASE_FREE = ("lora", "loha", "lokr", "full")


@dataclass(frozen=True)
class Factored:
    """Result of factoring one dense delta: the factors (fp32), the singular values, kept rank."""

    up: torch.Tensor
    down: torch.Tensor
    singular_values: torch.Tensor
    rank: int

    @property
    def retained_fro(self) -> float:
        """√(Σ_{j≤k} S_j² / Σ S_j²); 1.0 for an all-zero delta."""
        s2 = self.singular_values.double().pow(2)
        total = float(s2.sum())
        return 1.0 if total == 0.0 else float((s2[: self.rank].sum() / total).sqrt())

    @property
    def discarded_energy(self) -> float:
        """Σ_{j>k} S_j² (= ‖M − up@down‖_F² in exact arithmetic)."""
        return float(self.singular_values[self.rank:].double().pow(2).sum())


def select_rank(s: torch.Tensor, method: str, param: float | None, max_rank: int) -> int:
    """Number of singular values to keep (``s`` sorted descending)."""
    n = int(s.numel())
    cap = max(1, min(int(max_rank), n))
    if method == "fixed" or n == 0:
        return cap
    if param is None:
        raise ToolError(f"rank method {method} needs a parameter")
    s = s.double()
    if float(s[0]) == 0.0:
        return 1
    if method == "sv_ratio":
        if param <= 0:
            raise ToolError("sv_ratio parameter must be > 0")
        k = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        k = _first_reaching(s.cumsum(0) / s.sum(), param)
    elif method == "sv_fro":
        k = _first_reaching((s.pow(2).cumsum(0) / s.pow(2).sum()).sqrt(), param)
    else:
        raise ToolError(f"unknown rank method {method!r} (one of {', '.join(METHODS)})")
    return max(1, min(k, cap))


def _first_reaching(fractions: torch.Tensor, p: float) -> int:
    """Smallest k ≥ 1 with fractions[k-1] ≥ p (all of them when none reaches p through rounding)."""
    hits = torch.nonzero(fractions >= p - 1e-12)
    return int(hits[0]) + 1 if hits.numel() else int(fractions.numel())


def _shaped(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, shape, method, param, max_rank) -> Factored:
    k = select_rank(s, method, param, max_rank)
    up = (u[:, :k] * s[:k]).cpu()
    down = vh[:k].cpu()
    if len(shape) == 4:
        up = up.reshape(shape[0], k, 1, 1)
        down = down.reshape(k, *shape[1:])
    return Factored(up.contiguous(), down.contiguous(), s.cpu(), k)


def factor_product(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...], method: str = "fixed",
                   param: float | None = None, max_rank: int = 8, device=None) -> Factored:
    """:func:`factor` of M = up (o, R) @ down (R, n) without forming M: with up = Q_a R_a and
    downᵀ = Q_b R_b (thin QR), M = Q_a (R_a R_bᵀ) Q_bᵀ, so the SVD of the R×R core gives M's
    (its other singular values are 0). Same result as :func:`factor`, at O((o+n)R²) cost."""
    a = up.to(device=device or up.device, dtype=COMPUTE).reshape(shape[0], -1)
    b = down.to(device=a.device, dtype=COMPUTE).reshape(a.shape[1], -1)
    if a.shape[1] >= min(a.shape[0], b.shape[1]):  # not low-rank: the dense SVD is as cheap
        return factor((a @ b).reshape(shape), method, param, max_rank, device)
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b.T)
    uc, s, vch = torch.linalg.svd(ra @ rb.T)
    return _shaped(qa @ uc, s, vch @ qb.T, shape, method, param, max_rank)


def factor(delta: torch.Tensor, method: str = "fixed", param: float | None = None, max_rank: int = 8,
           device: torch.device | str | None = None) -> Factored:
    """Truncated SVD of ``delta`` (any shape with dim 0 = outputs), factors shaped for kohya."""
    shape = tuple(delta.shape)
    m = delta.to(device=device or delta.device, dtype=COMPUTE).reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return _shaped(u, s, vh, shape, method, param, max_rank)


def locon_factors(adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (o, r), down (r, n)) of a LoRA module, unscaled, fp32; a Tucker core is folded into
    down: down'[a, i, h, w] = Σ_b mid[a, b, h, w]·down[b, i] (the same ΔW, as plain LoCon)."""
    f = adapter.factors()
    down = f.down.reshape(f.down.shape[0], -1)
    if f.mid is not None:
        down = torch.einsum("abhw,bi->aihw", f.mid, down).reshape(f.mid.shape[0], -1)
    return f.up.reshape(f.up.shape[0], -1), down


def dense_delta(name: str, adapter) -> torch.Tensor:
    """ΔW of one module at strength 1, fp32, in the adapter's natural shape. Refuses adapters whose
    delta depends on the base weights (DoRA, IA3, OFT, GLoRA) or that are not matrices (norm)."""
    if adapter.kind not in BASE_FREE:
        why = "depends on the base model's weights" if adapter.kind != "norm" else "is a norm-layer patch"
        raise ToolError(f"{name}: a {adapter.kind} module {why}; it cannot be turned into a plain LoRA without the model")
    shape = tuple(adapter.natural_shape())
    return adapter.delta(torch.zeros(shape, dtype=COMPUTE)).weight


def adapter_bias(adapter) -> torch.Tensor | None:
    """The bias delta a module carries (kohya LoRA files cannot store one)."""
    for attr in ("up_bias", "diff_b"):
        if getattr(adapter, attr, None) is not None:
            return getattr(adapter, attr)
    return None
