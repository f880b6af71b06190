"""The one place where a slot's contributions become a weight (and bias) delta.

ΔW = Σ_k m_k · ΔW_k(W₀), each ΔW_k computed in fp32 from the same original weight W₀. Terms are
taken in signature order (LoRA id, module, strength), so the bits do not depend on the stack's order.

Plain LoRA/LoCon terms (no Tucker ``mid``) are summed as one product
    Σ_k m_k·s_k·up_k·down_k = [m_1 s_1 up_1 | … | m_k s_k up_k] · [down_1; …; down_k]
one GEMM of inner size Σr instead of k GEMMs plus k full-size scale and add passes; with the base
given (``merged_weight``) the product lands in the destination buffer, then W = ΔW + W₀ in place.
Terms placed at rows of a fused weight (``rows.PlacedLoRA``: the q, k, v, mlp LoRAs of one ``qkv`` or
``linear1``) are one such product per row range, over their own rows only: ΔW[a:b] = U_ab · D_ab (added
to the whole-weight product when there is one); rows no term covers hold −0.0, so W₀ + ΔW keeps W₀'s
bits there (x + (−0) = x for every x, −0 included).
Merged mode, on-the-fly dense deltas and ``bake`` all call this.
"""
from __future__ import annotations

import math

import torch

from ..adapters.base import COMPUTE
from ..adapters.lora import LoRA
from ..adapters.set_weight import multiplier
from .device_factors import on_device
from .rows import PlacedLoRA


def _ordered(contributions) -> list:
    return sorted(contributions, key=lambda c: c.signature)


def _lowrank(c) -> bool:
    return isinstance(c.adapter, LoRA) and c.adapter.mid is None


def _placement(c) -> tuple[int, int] | None:
    return c.adapter.rows if isinstance(c.adapter, PlacedLoRA) else None


def _up(a) -> torch.Tensor:
    return a.own_up() if isinstance(a, PlacedLoRA) else a.up


def _stacked_factors(terms, device) -> tuple[torch.Tensor, torch.Tensor]:
    """U (o × Σr) with m·s folded in, D (Σr × i·k·k), both fp32 on ``device``. Several terms are
    concatenated in their stored dtype first (exact: the upcast follows), so the stack costs one
    concatenation and one cast per factor, then each term's columns of U are scaled in place (by a
    Python scalar: no host-to-device copy, which on a GPU would wait for the queue at every slot)."""
    if len(terms) == 1:
        c = terms[0]
        a = c.adapter
        up = _up(a)
        return (up.to(device=device, dtype=COMPUTE).reshape(up.shape[0], -1) * (a.scale * c.strength),
                a.down.to(device=device, dtype=COMPUTE).reshape(a.rank, -1))
    ups = [_up(c.adapter).to(device).reshape(_up(c.adapter).shape[0], -1) for c in terms]
    downs = [c.adapter.down.to(device).reshape(c.adapter.rank, -1) for c in terms]
    u = torch.cat(ups, 1).to(COMPUTE)
    start = 0
    for c in terms:
        u[:, start:start + c.adapter.rank].mul_(c.adapter.scale * c.strength)
        start += c.adapter.rank
    return u, torch.cat(downs, 0).to(COMPUTE)


def _bias_terms(terms, device) -> torch.Tensor | None:
    db = None
    for c in terms:
        if c.adapter.up_bias is not None:
            db = _accumulate(db, (c.adapter.scale * c.strength) * c.adapter.up_bias.to(device, COMPUTE).reshape(-1))
    return db


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _other_terms(others, w0: torch.Tensor, device, into: torch.Tensor | None):
    """Σ m_k·ΔW_k of the terms that are not plain low-rank, the first one written into ``into`` when given
    (each adapter's ``scaled_delta`` folds m_k into its own factors); and Σ m_k·Δb_k."""
    dw = db = None
    for c in others:
        a = c.adapter if device.type == "cpu" else on_device(c.adapter, device)
        m = multiplier(c.adapter, c.strength)  # a set-weight: 1 (W = value) at any non-zero strength
        term = a.scaled_delta(w0, m, out=into if dw is None else None)
        if term is not None:
            if dw is None and into is not None:
                dw = into if term.data_ptr() == into.data_ptr() else into.copy_(term.reshape(into.shape))
            else:
                dw = _accumulate(dw, term.to(device))
        if a.has_bias_delta:
            db = _accumulate(db, m * a.bias_delta().to(device=device, dtype=COMPUTE).reshape(-1))
    return dw, db


def summed_delta(contributions, base_weight: torch.Tensor, device: torch.device | None = None,
                 into: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(ΔW, Δb) in fp32 (None where no term has one). ``into``: an fp32 contiguous buffer of the
    weight's shape (not aliasing the base) that receives ΔW instead of a fresh tensor (a term that
    fails may leave it written)."""
    device = device or base_weight.device
    ordered = _ordered(contributions)
    lowrank = [c for c in ordered if _lowrank(c)]
    others = [c for c in ordered if not _lowrank(c)]
    dw = db = None
    if others:  # each adapter upcasts the base itself where it reads it
        dw, db = _other_terms(others, base_weight.to(device), device, into)
    if not lowrank:
        return dw, db
    _check_fit(lowrank, base_weight)
    target = None if dw is not None and dw is into else into  # ``into`` already holds the other terms
    if any(_placement(c) is not None for c in lowrank):
        low = _placed_product(lowrank, base_weight, device, target)
    else:
        u, d = _stacked_factors(lowrank, device)
        if target is not None:
            low = torch.mm(u, d, out=_flat(target)).view(target.shape)
        else:
            low = (u @ d).reshape(base_weight.shape)
    if dw is not None:
        low = dw.add_(low) if dw is into else low.add_(dw)
    bias = _bias_terms(lowrank, device)
    return low, (bias if db is None else _accumulate(bias, db))


def _placed_product(terms, base_weight: torch.Tensor, device, into: torch.Tensor | None) -> torch.Tensor:
    """Σ m·s·up·down of low-rank terms some of which are placed at rows: one product per row range (the
    whole weight first), each over its own rows; −0.0 where no term reaches. Disjoint ranges (q, k, v,
    mlp) are written by their product directly (the bits of a slot of those rows alone), only the rows
    between them filled."""
    groups: dict[tuple[int, int] | None, list] = {}
    for c in terms:
        groups.setdefault(_placement(c), []).append(c)
    whole = groups.pop(None, None)
    low = into if into is not None else torch.empty(base_weight.shape, dtype=COMPUTE, device=device)
    flat = _flat(low)
    ranges = sorted(groups)
    disjoint = whole is None and all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    if whole is not None:
        u, d = _stacked_factors(whole, device)
        torch.mm(u, d, out=flat)
    elif disjoint:
        for start, stop in zip([0] + [b for _, b in ranges], [a for a, _ in ranges] + [flat.shape[0]]):
            if start < stop:
                flat[start:stop].fill_(-0.0)
    else:
        flat.fill_(-0.0)
    for a, b in ranges:
        u, d = _stacked_factors(groups[(a, b)], device)
        if disjoint:
            torch.mm(u, d, out=flat[a:b])
        else:
            flat[a:b].add_(u @ d)
    return low


def summed_bias(contributions, device: torch.device) -> torch.Tensor | None:
    """Σ m_k·Δb_k in fp32 on ``device`` (None when no term has a Δb), without the base weight (Δb never
    depends on it): the same bits as ``summed_delta``'s Δb, for hosts that patch a bias on its own."""
    ordered = _ordered(contributions)
    bias = _bias_terms([c for c in ordered if _lowrank(c)], device)
    db = None
    for c in ordered:
        if not _lowrank(c) and c.adapter.has_bias_delta:
            b = (c.adapter if device.type == "cpu" else on_device(c.adapter, device)).bias_delta()
            db = _accumulate(db, c.strength * b.to(device).reshape(-1))
    return bias if db is None else (db if bias is None else _accumulate(bias, db))


def merged_weight(contributions, w0: torch.Tensor, out: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(W₀ + ΔW, Δb) in fp32, the same bits as ``fp32(w0) + summed_delta(…)[0]`` (what ComfyUI's patch
    path computes; ``w0`` may be any float dtype, its upcast is exact), written into ``out`` when given
    (fp32, contiguous, w0's shape; ``w0`` itself is allowed, then W₀ is overwritten). ``None`` for the
    weight when no term changes it."""
    if any(getattr(c.adapter, "absolute", False) for c in contributions):
        return _set(contributions, w0, out)
    into = out if out is not None and out.data_ptr() != w0.data_ptr() else None
    dw, db = summed_delta(contributions, w0, into=into)
    if dw is None:
        return None, db
    if out is None:
        return (add_base(dw, w0) if dw.shape == w0.shape else w0 + dw), db
    if dw is out:
        return add_base(out, w0), db
    if w0.dtype != out.dtype:
        return add_base(out.copy_(dw.reshape(w0.shape)), w0), db
    return torch.add(w0, dw.reshape(w0.shape), out=out), db


def _set(contributions, w0: torch.Tensor, out: torch.Tensor | None):
    """W = value + Σ ΔW of the other terms: a set-weight replaces W₀ exactly (bit for bit, not W₀ + (value − W₀));
    of several, the last in signature order (a later ``set`` patch wins in ComfyUI)."""
    sets = [c for c in _ordered(contributions) if getattr(c.adapter, "absolute", False)]
    rest = [c for c in contributions if not getattr(c.adapter, "absolute", False)]
    dw, db = summed_delta(rest, w0) if rest else (None, None)
    value = sets[-1].adapter.value.to(device=w0.device, dtype=COMPUTE).reshape(w0.shape)
    new = value if dw is None else value + dw.reshape(w0.shape)
    if out is None:
        return (new.clone() if new is value else new), db
    return out.copy_(new), db


_UPCAST_BLOCK = 1 << 20  # elements: a 4 MB fp32 buffer, reused, stays in cache


def add_base(acc: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """acc += W₀ in acc's dtype (fp32), W₀ upcast exactly: the same bits as ``acc.add_(w0)``. On the
    CPU a mixed-dtype ``add_`` of a large half tensor runs 2-7× slower than an upcast copy plus an fp32
    add (measured 20 ms against 3 ms for SDXL's 10240×1280 layers), so a half W₀ is upcast in blocks
    through one small buffer."""
    if w0.dtype == acc.dtype or acc.device.type != "cpu" or not acc.is_contiguous():
        return acc.add_(w0)
    flat_acc, flat_w0 = acc.view(-1), w0.reshape(-1)
    n = flat_acc.numel()
    buf = torch.empty(min(n, _UPCAST_BLOCK), dtype=acc.dtype)
    for start in range(0, n, _UPCAST_BLOCK):
        stop = min(n, start + _UPCAST_BLOCK)
        block = buf[:stop - start].copy_(flat_w0[start:stop])
        flat_acc[start:stop].add_(block)
    return acc


def _check_fit(terms, w0: torch.Tensor) -> None:
    n = w0.numel()
    for c in terms:
        a = c.adapter
        if a.up.shape[0] * math.prod(a.down.shape[1:]) != n:
            raise ValueError(f"lora: delta of shape {[a.up.shape[0], *a.down.shape[1:]]} does not fit "
                             f"target {list(w0.shape)}")


def _accumulate(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """total + term, in place when shapes allow (``total`` is always a fresh product here): same bits,
    one full-size buffer less per contribution."""
    if total is None:
        return term
    return total.add_(term) if total.shape == term.shape else total + term
