"""LoRA / LoCon / Tucker (kohya ``lora_down``/``lora_up``/``lora_mid``; PEFT ``lora_A``/``lora_B``).

ΔW = s · reshape(up(o,r) @ down(r, i·k·k))                        (plain and LoCon)
ΔW[o,i,:,:] = s · Σ_ab up[o,a] · mid[a,b,:,:] · down[b,i]          (Tucker, ``lora_mid``)
with s = α/r (r = down.shape[0]; α missing ⇒ α = r), or the file's ``scale`` key.
A PEFT ``lora_B.bias`` adds Δb = s·bias.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .base import AdapterBase, Delta, LowRankFactors, f32, fit


@dataclass(frozen=True)
class LoRA(AdapterBase):
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    mid: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    kind = "lora"
    bias_field = "up_bias"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def check(self) -> None:
        r = self.rank
        if self.up.ndim < 2 or self.up.shape[1] != (self.mid.shape[0] if self.mid is not None else r):
            raise ValueError(
                f"up {list(self.up.shape)} and down {list(self.down.shape)} do not chain (rank {r})"
            )
        if self.mid is not None and self.mid.shape[1] != r:
            raise ValueError(f"mid {list(self.mid.shape)} does not chain with down {list(self.down.shape)}")

    def natural_shape(self) -> tuple[int, ...]:
        o = self.up.shape[0]
        if self.mid is not None:
            return (o, self.down.shape[1], *self.mid.shape[2:])
        return (o, *self.down.shape[1:])

    def truncated(self, dyn: int) -> "LoRA":
        """A1111's ``dyn=``: keep the first ``dyn`` ranks, keep the scale α/r_full."""
        if dyn <= 0 or dyn >= self.rank or self.mid is not None:
            return self
        return replace(self, down=self.down[:dyn], up=self.up[:, :dyn])

    def dense(self) -> torch.Tensor:
        # s is folded into the small up (o×r) factor: one pass less over the o×i result
        up = f32(self.up).reshape(self.up.shape[0], -1) * self.scale
        down = f32(self.down)
        if self.mid is not None:
            return torch.einsum("oa,ab...,bi->oi...", up, f32(self.mid), down.reshape(down.shape[0], -1))
        return up @ down.reshape(down.shape[0], -1)

    def delta(self, base: torch.Tensor) -> Delta:
        return Delta(fit(self.dense(), base.shape, "lora"), self.bias_delta())

    def factors(self) -> LowRankFactors:
        return LowRankFactors(f32(self.down), f32(self.up), f32(self.mid), self.scale, f32(self.up_bias))
