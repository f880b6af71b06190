"""bitsandbytes 4-bit weights (``Params4bit``, NF4 or FP4), as diffusers + bitsandbytes and Forge hold them.

The Parameter holds packed 4-bit codes (uint8, two per byte, flattened) and a ``quant_state``: per block
of ``blocksize`` values an absmax (itself 8-bit quantized when ``compress_statistics``/nested), the
code book, the logical shape and dtype. bitsandbytes' own functions do the math:
    W = dequantize_4bit(codes, quant_state)
    requant: codes', state' = quantize_4bit(W, blocksize, compress_statistics, quant_type)
The blocks run across rows, so a row range of the weight is not addressable: only whole weights are
merged. A restore puts back the packed bytes and the original ``quant_state`` object.
"""
from __future__ import annotations

import torch

from .base import QuantError, QuantWeight


def is_params4bit(t) -> bool:
    return type(t).__name__ == "Params4bit" and getattr(t, "quant_state", None) is not None


class Nf4Weight(QuantWeight):
    def __init__(self, owner, name):
        super().__init__(owner, name)
        try:
            import bitsandbytes.functional as bnbf
        except ImportError as e:  # pragma: no cover
            raise QuantError(f"a bitsandbytes 4-bit weight, but bitsandbytes cannot be imported ({e})")
        self._bnbf = bnbf

    @property
    def format(self) -> str:
        return f"bitsandbytes {self.param.quant_state.quant_type.upper()}"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.quant_state.shape)

    def _codes(self) -> torch.Tensor:
        return self.param.detach().as_subclass(torch.Tensor)

    def merge_problem(self, rows=None) -> str | None:
        if rows is not None:
            return f"{self.format}: a row range of a 4-bit weight cannot be re-quantized alone (blocks span rows)"
        return None

    def stored(self, rows=None):
        return self._codes().clone(), self.param.quant_state

    def put(self, stored, rows=None) -> None:
        codes, state = stored
        self._codes().copy_(codes)
        self.param.quant_state = state

    def dequant_stored(self, stored, rows=None) -> torch.Tensor:
        codes, state = stored
        return self._bnbf.dequantize_4bit(codes.to(state.absmax.device), state).float().reshape(state.shape)

    def requant(self, w: torch.Tensor, rows=None) -> None:
        old = self.param.quant_state
        codes, state = self._bnbf.quantize_4bit(
            w.to(device=self.param.device, dtype=torch.float32).contiguous(), blocksize=old.blocksize,
            compress_statistics=old.nested, quant_type=old.quant_type, quant_storage=self.param.dtype)
        state.dtype = old.dtype  # quantized from fp32, read back in the layer's dtype as before
        self._codes().copy_(codes.reshape(self._codes().shape))
        self.param.quant_state = state
