"""What every adapter type shares: the result type, the factored form, shape helpers.

Conventions (all types):
- ``delta(base)`` returns ``Delta(weight=W' - W, bias=b' - b)`` at strength 1, in fp32,
  with the module's scale already folded in. ``base`` is the target's current weight
  (any dtype/device); additive types only read its shape.
- Strength ``m`` is linear on that delta for every type: ``W + m·(W' - W)``, as A1111
  and ComfyUI do. Strength 0 is the base; several adapters on one weight are each
  computed from the same original ``W`` and summed, so stacking is order-independent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

COMPUTE = torch.float32


@dataclass(frozen=True)
class Delta:
    weight: torch.Tensor | None
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class LowRankFactors:
    """``y += scale · up(mid(down(x)))``; convs use the target's stride/padding on the
    first k×k layer (``down``, or ``mid`` when Tucker). Tensors are fp32."""

    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None
    scale: float
    bias: torch.Tensor | None = None  # added to the output with the same scale


def f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(COMPUTE)


def fit(delta: torch.Tensor, shape: torch.Size | tuple[int, ...], what: str) -> torch.Tensor:
    """Reshape a flat (o, i·k·k) or 1×1-conv delta onto the target shape, or fail clearly."""
    if tuple(delta.shape) == tuple(shape):
        return delta
    if delta.numel() != int(torch.Size(shape).numel()):
        raise ValueError(f"{what}: delta of shape {list(delta.shape)} does not fit target {list(shape)}")
    return delta.reshape(shape)


def cp_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker/CP rebuild: ``out[p,q,...] = Σ_ab t[a,b,...]·wa[a,p]·wb[b,q]``."""
    return torch.einsum("ab...,ap,bq->pq...", t, wa, wb)
