"""DoRA (``dora_scale`` / PEFT ``lora_magnitude_vector``) on top of any additive adapter.

V = W + ΔW_inner;  W' = mag ⊙ V / ‖V‖_axis;  ΔW = W' − W  (strength linear: W + m·ΔW,
so strength 0 is the base, as A1111 and ComfyUI define it).
Axis from the magnitude's shape: (o,), (o,1,…) → per output row (norm over all dims but 0: PEFT, LyCORIS ≥ 3.2); (1,i,…) → per input
column (norm over all dims but 1: older kohya/LyCORIS, A1111). PEFT's ``lora_magnitude_vector`` is always per output row
(its conv layout (1,o,1,1) is forced with ``axis=0``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Adapter, AdapterBase, Delta, f32


def dora_axis(mag_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    """0 = output rows, 1 = input columns, decided by the magnitude's shape."""
    o = weight_shape[0]
    i = weight_shape[1] if len(weight_shape) > 1 else None
    numel = 1
    for d in mag_shape:
        numel *= d
    if mag_shape and mag_shape[0] == o and numel == o:  # (o,), (o,1), (o,1,1,1)
        return 0
    if len(mag_shape) >= 2 and mag_shape[0] == 1 and numel == i:  # (1,i), (1,i,1,1)
        return 1
    raise ValueError(f"DoRA magnitude {list(mag_shape)} fits neither axis of weight {list(weight_shape)}")


@dataclass(frozen=True)
class DoRA(AdapterBase):
    inner: Adapter  # an additive adapter (LoRA, LoHa, LoKr, ...)
    magnitude: torch.Tensor
    axis: int | None = None  # forced axis (PEFT files: 0); None = detect from shape
    kind = "dora"

    @property
    def scale(self) -> float:
        return self.inner.scale

    @property
    def label(self) -> str:
        return f"dora({self.inner.label})"

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def has_bias_delta(self) -> bool:
        return self.inner.has_bias_delta

    def bias_delta(self) -> torch.Tensor | None:
        return self.inner.bias_delta()

    def natural_shape(self) -> tuple[int, ...] | None:
        return self.inner.natural_shape()

    def layer_widths(self) -> tuple[int | None, int | None]:
        return self.inner.layer_widths()

    def check(self) -> None:
        self.inner.check()

    def misfit(self, shape: tuple[int, ...]) -> str | None:
        why = self.inner.misfit(shape)
        if why is None:
            try:
                dora_axis(tuple(self.magnitude.shape), tuple(shape))
            except ValueError as e:
                why = str(e)
        return why

    def delta(self, base: torch.Tensor) -> Delta:
        w = f32(base)
        inner = self.inner.delta(base)
        v = w + inner.weight
        axis = self.axis if self.axis is not None else dora_axis(tuple(self.magnitude.shape), tuple(w.shape))
        reduce = [d for d in range(v.ndim) if d != axis]
        norm = torch.linalg.vector_norm(v, dim=reduce, keepdim=True)
        mag = f32(self.magnitude).reshape(norm.shape)
        return Delta(mag * v / norm - w, inner.bias)
