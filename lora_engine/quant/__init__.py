"""Quantized base weights: one module per storage format, one entry point.

``quant_weight(owner, name)`` gives the ``QuantWeight`` of a layer's parameter (None for a plain
fp16/bf16/fp32 weight), raising ``QuantError`` for one the engine cannot read (an unknown quant type).
Formats: plain fp8 and scaled fp8 (``fp8``), GGUF blocks (``gguf_weight``), bitsandbytes 4-bit (``nf4``).
"""
from __future__ import annotations

import torch

from .base import QuantError, QuantWeight
from .fp8 import Fp8Weight, ScaledFp8Weight, is_fp8, scaled_fp8_dtype, weight_scale
from .gguf_weight import GgufWeight, gguf_type
from .nf4 import Nf4Weight, is_params4bit

__all__ = ["QuantError", "QuantWeight", "quant_weight", "quant_weight_at", "is_quantized", "logical_shape",
           "scaled_fp8_dtype"]


def is_quantized(t) -> bool:
    """Whether a tensor is stored in a quantized format (fp8, GGUF blocks, bitsandbytes 4-bit)."""
    if not isinstance(t, torch.Tensor):
        return False
    return is_params4bit(t) or gguf_type(t) is not None or is_fp8(t)


def logical_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape a weight has as a matrix/kernel (packed formats store another one)."""
    if is_params4bit(t):
        return tuple(t.quant_state.shape)
    return tuple(int(d) for d in getattr(t, "tensor_shape", t.shape))


def quant_weight(owner: torch.nn.Module, name: str) -> QuantWeight | None:
    t = owner._parameters.get(name) if name in owner._parameters else getattr(owner, name, None)
    if not is_quantized(t):
        return None
    if is_params4bit(t):
        return Nf4Weight(owner, name)
    if gguf_type(t) is not None:
        return GgufWeight(owner, name)
    if weight_scale(owner, name) is not None:
        return ScaledFp8Weight(owner, name)
    return Fp8Weight(owner, name)


def quant_weight_at(root: torch.nn.Module, key: str) -> QuantWeight | None:
    """``quant_weight`` of the parameter at a state-dict key; a ``QuantError`` names the key."""
    path, _, name = key.rpartition(".")
    owner = root.get_submodule(path) if path else root
    try:
        return quant_weight(owner, name)
    except QuantError as e:
        raise QuantError(f"{key}: {e}") from None
