"""The one place where a slot's contributions become a weight (and bias) delta.

ΔW = Σ_k m_k · ΔW_k(W₀), each ΔW_k computed in fp32 from the same original weight W₀, so the
sum is order-independent. Merged mode, on-the-fly dense deltas and ``bake`` all call this.
"""
from __future__ import annotations

import torch

from ..adapters.base import COMPUTE


def summed_delta(contributions, base_weight: torch.Tensor, device: torch.device | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    device = device or base_weight.device
    w0 = base_weight.to(device=device, dtype=COMPUTE)
    dw = db = None
    for c in contributions:
        d = c.adapter.delta(w0) if device.type == "cpu" else _on_device(c.adapter, device).delta(w0)
        if d.weight is not None:
            dw = _accumulate(dw, c.strength * d.weight.to(device))
        if d.bias is not None:
            db = _accumulate(db, c.strength * d.bias.to(device).reshape(-1))
    return dw, db


def _accumulate(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """total + term, in place when shapes allow (``total`` is always a fresh product here): same bits,
    one full-size buffer less per contribution."""
    if total is None:
        return term
    return total.add_(term) if total.shape == term.shape else total + term


def _on_device(adapter, device):
    """A copy of a frozen adapter dataclass with its tensors on ``device`` (math then runs there)."""
    import dataclasses

    changes = {}
    for f in dataclasses.fields(adapter):
        v = getattr(adapter, f.name)
        if isinstance(v, torch.Tensor):
            changes[f.name] = v.to(device)
        elif dataclasses.is_dataclass(v):
            changes[f.name] = _on_device(v, device)
    return dataclasses.replace(adapter, **changes)
