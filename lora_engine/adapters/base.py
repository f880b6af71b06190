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

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

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


@runtime_checkable
class Adapter(Protocol):
    """What every adapter type provides; the rest of the engine knows adapters only through this.

    - ``kind``: the registry name ("lora", "loha", "lokr", "ia3", "glora", "full", "norm", "oft", "dora");
    - ``label``: ``kind``, or "dora(<inner kind>)" for DoRA;
    - ``scale``: the file's scale (α/r, α/√r for rsLoRA, or a ``scale`` key), already folded into ``delta``;
    - ``rank``: the low-rank dimension, None for types without one;
    - ``check()``: ``ValueError`` when the tensors do not chain;
    - ``layer_widths()``: (output, input) width of the layer the adapter was made for, None where its
      tensors do not tell (what ``inspect`` reads the model family from);
    - ``misfit(shape)``: why the adapter cannot apply to a weight of that shape (tensor shapes only), or None;
    - ``delta(base)``: ``Delta(W' − W, b' − b)`` at strength 1, fp32 (see the module docstring);
    - ``scaled_delta(base, m, out=None)``: m·(W' − W) in fp32 of the base's shape (None when the type has
      no ΔW), written into ``out`` (fp32, contiguous, not the base) when given;
    - ``has_bias_delta`` / ``bias_delta()``: whether there is a Δb and its value; Δb never depends on the
      base weight, and ``bias_delta()`` is exactly ``delta(base).bias``.
    """

    kind: ClassVar[str]
    scale: float

    @property
    def label(self) -> str: ...

    @property
    def rank(self) -> int | None: ...

    @property
    def has_bias_delta(self) -> bool: ...

    def layer_widths(self) -> tuple[int | None, int | None]: ...

    def check(self) -> None: ...

    def misfit(self, shape: tuple[int, ...]) -> str | None: ...

    def delta(self, base: torch.Tensor) -> Delta: ...

    def scaled_delta(self, base: torch.Tensor, factor: float, out: torch.Tensor | None = None
                     ) -> torch.Tensor | None: ...

    def bias_delta(self) -> torch.Tensor | None: ...


class AdapterBase:
    """Defaults of the :class:`Adapter` protocol for the adapter dataclasses: no rank; a bias delta
    Δb = s·t (or t when ``bias_scaled`` is False) where ``bias_field`` names the field holding t; and
    a shape fit decided by the delta's natural shape (``natural_shape()``) having the weight's number of
    elements (a flat (o, i·k·k) delta reshapes onto (o, i, k, k))."""

    kind: ClassVar[str] = ""
    bias_field: ClassVar[str | None] = None
    bias_scaled: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return self.kind

    @property
    def rank(self) -> int | None:
        return None

    @property
    def has_bias_delta(self) -> bool:
        return self.bias_field is not None and getattr(self, self.bias_field) is not None

    def bias_delta(self) -> torch.Tensor | None:
        t = getattr(self, self.bias_field) if self.bias_field is not None else None
        if t is None:
            return None
        return self.scale * f32(t) if self.bias_scaled else f32(t)

    def scaled_delta(self, base: torch.Tensor, factor: float, out: torch.Tensor | None = None
                     ) -> torch.Tensor | None:
        """factor·ΔW: ``delta(base).weight`` times ``factor``, into ``out`` when given. Types whose ΔW
        is a full-size product (LoHa, LoKr) override it to fold ``factor`` into a small factor and write
        the product straight into ``out``."""
        d = self.delta(base).weight
        if d is None:
            return None
        return torch.mul(d, factor, out=out) if out is not None else factor * d

    def natural_shape(self) -> tuple[int, ...] | None:
        """The shape of ΔW as the tensors give it, or None when only the target decides it."""
        return None

    def layer_widths(self) -> tuple[int | None, int | None]:
        try:
            s = self.natural_shape() or ()
        except (RuntimeError, ValueError, IndexError):
            s = ()
        return (int(s[0]) if s else None), (int(s[1]) if len(s) > 1 else None)

    def misfit(self, shape: tuple[int, ...]) -> str | None:
        try:
            natural = self.natural_shape()
        except (RuntimeError, ValueError, IndexError):
            return "its tensors do not chain"
        if natural is not None and math.prod(natural) != math.prod(shape):
            return f"delta {list(natural)} vs weight {list(shape)}"
        return None


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
