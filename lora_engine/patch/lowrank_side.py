"""All plain low-rank terms of one module as one side path (on-the-fly mode's hot loop).

With k LoRAs on a layer, D = [down_1; …; down_k] (Σr × i[×kh×kw]) and U = [up_1 … up_k] (o × Σr):
    y = base(x) + U · (ρ ⊙ D(x)),   ρ = per-rank scales (s_j · m_j · f_j repeated r_j times)
— two matmuls/convs, one multiply and one add whatever k is. ρ is rebuilt each forward from the
runtime factors (a vector of Σr numbers, or (batch, Σr) for per-sample factors), so changing a
factor costs nothing; D and U are concatenated once per (dtype, device).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class FusedLowRank:
    def __init__(self, terms, module: torch.nn.Module, dtype: torch.dtype, device: torch.device):
        conv = isinstance(module, torch.nn.Conv2d)
        downs, ups, self.ranks, self.static = [], [], [], []
        for term in terms:
            f = term.contribution.adapter.factors()
            r = f.down.shape[0]
            if conv:
                down = f.down if f.down.ndim == 4 else f.down.reshape(r, -1, 1, 1)
                up = f.up.reshape(f.up.shape[0], -1, 1, 1)
            else:
                down, up = f.down.reshape(r, -1), f.up.reshape(f.up.shape[0], -1)
            downs.append(down)
            ups.append(up)
            self.ranks.append(r)
            self.static.append(f.scale * term.contribution.strength)
        self.lora_ids = [t.contribution.lora_id for t in terms]
        self.down = torch.cat(downs, 0).to(device=device, dtype=dtype)
        self.up = torch.cat(ups, 1).to(device=device, dtype=dtype)
        self.conv = conv

    @staticmethod
    def compatible(terms, module) -> bool:
        """One kernel shape for every down (k×k LoCon downs must match, 1×1/linear always do)."""
        if not isinstance(module, torch.nn.Conv2d):
            return True
        shapes = {tuple(t.contribution.adapter.down.shape[2:]) if t.contribution.adapter.down.ndim == 4 else (1, 1)
                  for t in terms}
        return len(shapes) == 1

    def rank_scales(self, factors: list, h: torch.Tensor) -> torch.Tensor | None:
        """ρ shaped to broadcast over h; None when every factor is 0."""
        if all(isinstance(f, float) and f == 0.0 for f in factors):
            return None
        batch = next((f.numel() for f in factors if isinstance(f, torch.Tensor) and f.numel() > 1), None)
        parts = []
        for r, s, f in zip(self.ranks, self.static, factors):
            if isinstance(f, torch.Tensor):
                f = f.to(device=h.device, dtype=h.dtype).reshape(-1)
                v = (f * s).reshape(-1, 1) if f.numel() > 1 else (f * s).reshape(1, 1)
            else:
                v = torch.full((1, 1), s * f, device=h.device, dtype=h.dtype)
            parts.append(v.expand(batch or 1, r))
        rho = torch.cat(parts, 1)  # (batch or 1, Σr)
        if batch is not None and batch != h.shape[0]:
            from ..errors import LoraEngineError

            raise LoraEngineError(f"per-sample multipliers for {batch} samples, but the batch has {h.shape[0]}")
        if self.conv:
            return rho.reshape(rho.shape[0], -1, 1, 1)
        return rho.reshape(rho.shape[0], *([1] * (h.ndim - 2)), -1) if h.ndim > 1 else rho.reshape(-1)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, factors: list, module) -> torch.Tensor:
        if self.conv:
            h = F.conv2d(x, self.down, None, module.stride, module.padding, module.dilation)
        else:
            h = F.linear(x, self.down)
        rho = self.rank_scales(factors, h)
        if rho is None:
            return out
        h = h * rho
        side = F.conv2d(h, self.up) if self.conv else F.linear(h, self.up)
        return out + side
