"""Whether a tensor holds NaN/Inf, in one fast pass.

A finite fp32 sum proves every element finite (NaN and ±Inf propagate through a sum: Inf + -Inf is NaN),
so the common case costs one reduction; CPU ``isfinite`` on fp16 is ~20× slower and allocates a
mask. A non-finite sum (NaN/Inf, or finite values so large that the sum overflows) is confirmed exactly.
"""
from __future__ import annotations

import math

import torch


def nonfinite(t: torch.Tensor | None) -> bool:
    """True when ``t`` holds a NaN or an Inf (never for None, integer or empty tensors)."""
    if t is None or not t.is_floating_point() or t.numel() == 0 or t.device.type == "meta":
        return False  # a meta tensor (a model being planned, not run) holds no values to check
    if math.isfinite(float(t.sum(dtype=torch.float32))):
        return False
    return not bool(torch.isfinite(t).all())
