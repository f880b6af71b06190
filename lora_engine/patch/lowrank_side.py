"""All plain low-rank terms of one module as one side path (on-the-fly mode's hot loop).

With k LoRAs on a layer, D = [down_1; …; down_k] (Σr × i[×kh×kw]) and Û = [s_1 m_1 up_1 … s_k m_k up_k]
(o × Σr, each LoRA's scale s_j and plan strength m_j folded in once):
    y = base(x) + Û · (ρ ⊙ D(x)),   ρ = the runtime factors f_j repeated r_j times
— two matmuls/convs and no full-size pass of its own: for a Linear the second product is added into
the base output by the GEMM itself (``addmm``, in place when no gradient is being recorded; a 1×1
convolution runs as the same two products over the pixels, ``baddbmm``, rather than two convolutions
and an add pass). ρ is
skipped when every factor is 1, a single LoRA's scalar factor rides on the GEMM's ``alpha``, and the
vector for scalar factors is cached until they change; per-sample factors give ρ of shape (batch, Σr).
D and Û are concatenated once per (dtype, device).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class FusedLowRank:
    def __init__(self, contributions, module: torch.nn.Module, dtype: torch.dtype, device: torch.device):
        conv = isinstance(module, torch.nn.Conv2d)
        downs, ups, self.ranks = [], [], []
        for c in contributions:
            f = c.adapter.factors()
            r = f.down.shape[0]
            up = f.up.reshape(f.up.shape[0], -1) * (f.scale * c.strength)
            if conv:
                down = f.down if f.down.ndim == 4 else f.down.reshape(r, -1, 1, 1)
                up = up.reshape(up.shape[0], -1, 1, 1)
            else:
                down = f.down.reshape(r, -1)
            downs.append(down)
            ups.append(up)
            self.ranks.append(r)
        self.lora_ids = [c.lora_id for c in contributions]
        self.down = torch.cat(downs, 0).to(device=device, dtype=dtype)
        self.up = torch.cat(ups, 1).to(device=device, dtype=dtype)
        self.up_t = None if conv else self.up.t()  # (Σr × o) for addmm
        self.conv = conv
        # a 1×1, stride-1, unpadded conv: y[b] = W·x[b] over the H·W pixels, so the side path is two
        # batched matrix products on (B, C, H·W) views (D: Σr × C, Û: o × Σr)
        self.pointwise = conv and tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1) \
            and module.padding in ((0, 0), "valid") and module.groups == 1 and tuple(self.down.shape[2:]) == (1, 1)
        if self.pointwise:
            self.down_2d = self.down.reshape(self.down.shape[0], -1)
            self.up_2d = self.up.reshape(self.up.shape[0], -1)
        self._rho_key: tuple | None = None
        self._rho: torch.Tensor | None = None
        self._sample_rho_key: tuple | None = None  # (factor version, dtype, device, h.ndim)
        self._sample_rho: torch.Tensor | None = None

    @staticmethod
    def compatible(contributions, module) -> bool:
        """One kernel shape for every down (k×k LoCon downs must match, 1×1/linear always do)."""
        if not isinstance(module, torch.nn.Conv2d):
            return True
        shapes = {tuple(c.adapter.down.shape[2:]) if c.adapter.down.ndim == 4 else (1, 1) for c in contributions}
        return len(shapes) == 1

    def _scalar_rho(self, factors: tuple, h: torch.Tensor) -> torch.Tensor:
        """ρ for scalar factors, kept until the factors (or dtype/device) change."""
        key = (factors, h.dtype, h.device)
        if key != self._rho_key:
            rho = torch.cat([torch.full((r,), f, dtype=h.dtype) for r, f in zip(self.ranks, factors)]).to(h.device)
            self._rho_key, self._rho = key, rho.reshape(-1, 1, 1) if self.conv else rho
        return self._rho

    def rank_scales(self, factors: list, h: torch.Tensor, version: int | None = None):
        """How h must be scaled: ``None`` (all factors 0: no side path), a float (one value for every
        rank, applied through ``alpha``) or a tensor broadcasting over h. ``version`` (the patcher's
        factor version) lets a per-sample ρ be built once per change of factors, not per call."""
        if all(not isinstance(f, torch.Tensor) for f in factors):
            if all(f == 0.0 for f in factors):
                return None
            if len(set(factors)) == 1:
                return float(factors[0])
            return self._scalar_rho(tuple(factors), h)
        key = None if version is None else (version, h.dtype, h.device, h.ndim, h.shape[0])
        if key is not None and key == self._sample_rho_key:
            return self._sample_rho
        rho = self._sample_scales(factors, h)
        if key is not None:
            self._sample_rho_key, self._sample_rho = key, rho
        return rho

    def _sample_scales(self, factors: list, h: torch.Tensor) -> torch.Tensor:
        batch = next((f.numel() for f in factors if isinstance(f, torch.Tensor) and f.numel() > 1), None)
        if batch is not None and batch != h.shape[0]:
            from ..errors import LoraEngineError

            raise LoraEngineError(f"per-sample multipliers for {batch} samples, but the batch has {h.shape[0]}")
        parts = []
        for r, f in zip(self.ranks, factors):
            if isinstance(f, torch.Tensor):
                v = f.to(device=h.device, dtype=h.dtype).reshape(-1, 1)
            else:
                v = torch.full((1, 1), f, device=h.device, dtype=h.dtype)
            parts.append(v.expand(batch or 1, r))
        rho = torch.cat(parts, 1)  # (batch or 1, Σr)
        if self.conv:
            return rho.reshape(rho.shape[0], -1, 1, 1)
        return rho.reshape(rho.shape[0], *([1] * (h.ndim - 2)), -1) if h.ndim > 1 else rho.reshape(-1)

    def _scaled(self, h: torch.Tensor, factors: list, out: torch.Tensor, version=None, pointwise: bool = False):
        """(h scaled by ρ, the GEMM's α, whether ``out`` may be written in place), or None when every
        factor is 0. A single scalar factor rides on α; a tensor ρ multiplies h (in place when allowed)."""
        rho = self.rank_scales(factors, h.unsqueeze(-1) if pointwise else h, version)  # pointwise h: (B, Σr, H·W)
        if rho is None:
            return None
        in_place = not (torch.is_grad_enabled() and (out.requires_grad or h.requires_grad))
        if isinstance(rho, float):
            return h, rho, in_place
        if pointwise:
            rho = rho.squeeze(-1)  # conv-shaped (batch or 1, Σr, 1, 1) -> (batch or 1, Σr, 1)
        if in_place and h.shape == torch.broadcast_shapes(h.shape, rho.shape):
            return h.mul_(rho), 1.0, in_place
        return h * rho, 1.0, in_place

    def _pointwise(self, x: torch.Tensor, out: torch.Tensor, factors: list, version=None) -> torch.Tensor:
        b, c = x.shape[:2]
        scaled = self._scaled(torch.matmul(self.down_2d, x.reshape(b, c, -1)), factors, out, version, pointwise=True)
        if scaled is None:
            return out
        h, alpha, in_place = scaled
        o = out.shape[1]
        up = self.up_2d.expand(b, o, self.up_2d.shape[1])
        if in_place:
            out.view(b, o, -1).baddbmm_(up, h, alpha=alpha)
            return out
        return torch.baddbmm(out.reshape(b, o, -1), up, h, alpha=alpha).view(out.shape)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, factors: list, module, version: int | None = None
                 ) -> torch.Tensor:
        """``version``: the patcher's factor version (None: ρ is rebuilt at every call)."""
        if self.pointwise and x.ndim == 4 and out.is_contiguous() and out.dtype == x.dtype:
            return self._pointwise(x, out, factors, version)
        if self.conv:
            h = F.conv2d(x, self.down, None, module.stride, module.padding, module.dilation)
        else:
            h = F.linear(x, self.down)
        scaled = self._scaled(h, factors, out, version)
        if scaled is None:
            return out
        h, alpha, in_place = scaled
        if self.conv:
            side = F.conv2d(h, self.up)
            return out.add_(side, alpha=alpha) if in_place else out + (side if alpha == 1.0 else side * alpha)
        if out.dtype != h.dtype or not out.is_contiguous():
            side = F.linear(h, self.up)
            return out.add_(side, alpha=alpha) if in_place and out.dtype == side.dtype else out + side * alpha
        o = out.shape[-1]
        if in_place:
            out.view(-1, o).addmm_(h.reshape(-1, h.shape[-1]), self.up_t, alpha=alpha)
            return out
        return torch.addmm(out.view(-1, o), h.reshape(-1, h.shape[-1]), self.up_t, alpha=alpha).view(out.shape)
