"""Reduce a LoRA's rank by truncated SVD, per module (sd-scripts ``resize_lora.py`` semantics).

LoRA/LoCon/Tucker module: M = up @ [mid ·] down (unscaled, fp32, flattened to (o, n)), SVD, keep k
ranks (fixed or dynamic, ``tools.lowrank.select_rank``), α' = s·k so the scale s = α/r is kept:
ΔW' = s · U_k S_k V_kᵀ. Other base-independent types (LoHa, LoKr, full) are densified with their
scale folded in and written as LoRA with α' = k. A DoRA module's inner delta is resized and its
magnitude kept. k×k convs may get their own cap (``conv_rank``).

Per module the report gives the retained Frobenius fraction √(Σ_{j≤k}S_j²/ΣS_j²).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..formats import LoraFile, load_lora
from ..formats.writer import LoraTensors, write_kohya
from .convert_dit import kohya_dialect
from .lowrank import dense_delta, factor, factor_product, locon_factors
from .naming import titled
from .progress import Ticker


@dataclass(frozen=True)
class ResizeReport:
    name: str
    old_rank: int | None
    new_rank: int
    retained_fro: float


@dataclass
class ResizeResult:
    modules: dict[str, LoraTensors]
    reports: list[ResizeReport]
    metadata: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def resize_module(name: str, adapter, rank: int, method: str = "fixed", param: float | None = None,
                  conv_rank: int | None = None, dtype: torch.dtype | None = None, device=None):
    """(LoraTensors, ResizeReport) for one module."""
    inner = adapter.inner if adapter.kind == "dora" else adapter
    if inner.kind == "lora":
        shape, s, old = tuple(inner.natural_shape()), inner.scale, inner.rank
        dtype = dtype or inner.down.dtype
    else:
        m, s, old = dense_delta(name, inner), 1.0, getattr(inner, "rank", None)
        shape, dtype = tuple(m.shape), dtype or torch.float32
    cap = conv_rank if (conv_rank and len(shape) == 4 and shape[2] * shape[3] > 1) else rank
    if inner.kind == "lora":
        f = factor_product(*locon_factors(inner), shape, method, param, cap, device)
    else:
        f = factor(m, method, param, cap, device)
    mag = adapter.magnitude if adapter.kind == "dora" else None
    lt = LoraTensors(f.down.to(dtype), f.up.to(dtype), float(s * f.rank), dora_scale=mag)
    return lt, ResizeReport(name, old, f.rank, f.retained_fro)


def resize_lora(lf: LoraFile, rank: int, method: str = "fixed", param: float | None = None,
                conv_rank: int | None = None, dtype: torch.dtype | None = None, device=None,
                progress=None, cancel=None) -> ResizeResult:
    modules, reports = {}, []
    ticker = Ticker(len(lf.modules), progress, cancel)
    for name, ma in lf.modules.items():
        ticker.check()
        modules[name], rep = resize_module(name, ma.adapter, rank, method, param, conv_rank, dtype, device)
        reports.append(rep)
        ticker.tick(name)
    dropped = ("ss_network_dim", "ss_network_alpha") + (("ss_network_module", "ss_network_args")
                                                        if lf.format == "lycoris" else ())
    meta = {k: v for k, v in lf.metadata.items() if k not in dropped}
    how = f"{method} {param}" if method != "fixed" else "fixed"
    note = f"resized by lora-engine to rank {rank} ({how})"
    meta["ss_training_comment"] = (meta["ss_training_comment"] + "; " + note) if meta.get("ss_training_comment") else note
    modules, notes = kohya_dialect(modules, lf.metadata)
    return ResizeResult(modules, reports, meta, notes)


def resize_file(path: str | os.PathLike, out: str | os.PathLike, rank: int, **kwargs) -> ResizeResult:
    """Load, resize (see :func:`resize_lora`), write ``out`` atomically."""
    result = resize_lora(load_lora(path), rank, **kwargs)
    result.metadata = write_kohya(out, result.modules, titled(result.metadata, out))
    return result
