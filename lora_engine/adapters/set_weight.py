"""Set-weights (ComfyUI ``set_weight``; BFL control LoRAs' full ``…query_norm.scale`` tensors): the layer's
weight is replaced, not added to: ΔW = value − W₀, so W₀ + ΔW = value.

Hosts set such a tensor whatever the LoRA's strength (ComfyUI's ``set`` patch copies it, diffusers loads
control-LoRA norms into the model directly), so the engine applies it at full effect whenever the LoRA is
in the stack with a non-zero strength (``absolute``: the plan's strength is not a factor of it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdapterBase, Delta, f32


@dataclass(frozen=True)
class SetWeight(AdapterBase):
    value: torch.Tensor
    scale: float = 1.0
    kind = "set"
    absolute = True  # W = value at any non-zero strength

    def check(self) -> None:
        pass

    def natural_shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def delta(self, base: torch.Tensor) -> Delta:
        if self.value.numel() != base.numel():
            raise ValueError(f"set: value of shape {list(self.value.shape)} does not fit target {list(base.shape)}")
        return Delta(f32(self.value).to(base.device).reshape(base.shape) - f32(base), None)


def multiplier(adapter, strength: float) -> float:
    """The factor a term's ΔW gets: the strength, or 1 for a set-weight at any non-zero strength."""
    if getattr(adapter, "absolute", False):
        return 1.0 if strength != 0 else 0.0
    return strength
