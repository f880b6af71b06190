"""GGUF-quantized weights as ComfyUI-GGUF and Forge hold them.

The layer's Parameter is a tensor of raw blocks (uint8, one row of blocks per output row) carrying
``tensor_type`` (a ``gguf.GGMLQuantizationType``) and ``tensor_shape`` (the logical shape), as
ComfyUI-GGUF's ``GGMLTensor``. Dequantization and requantization are the ``gguf`` package's own
(``gguf.quants``, the reference implementation of llama.cpp's formats):
    W = dequantize(blocks, type)            requant: blocks = quantize(W, type), the same type
``gguf.quants`` has quantizers for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (and BF16), none for the K-quants
(Q2_K … Q6_K) nor the IQ types: merging into those is refused (on the fly works for every type).
F32/F16 tensors are plain torch tensors, not quantized.
"""
from __future__ import annotations

import torch

from .base import QuantError, QuantWeight, row_slice

_REQUANTIZES: dict = {}  # quant type -> whether gguf.quants can quantize it


def _gguf():
    """The ``gguf`` package (optional, extra "quant"), imported when a GGUF tensor is first met (it takes
    over a second to import), or None."""
    try:
        import gguf
        import gguf.quants
    except ImportError:  # pragma: no cover - exercised when gguf is not installed
        return None
    return gguf


def gguf_type(t: torch.Tensor):
    """The tensor's GGML quant type, or None for a plain tensor (no ``tensor_type``, F32 or F16)."""
    qtype = getattr(t, "tensor_type", None)
    if qtype is None:
        return None
    gguf = _gguf()
    if gguf is not None:
        try:
            qtype = gguf.GGMLQuantizationType(int(qtype))
        except ValueError:
            return qtype  # unknown: reported when read
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return None
    return qtype


def _name(qtype) -> str:
    return getattr(qtype, "name", repr(qtype))


def requantizes(qtype) -> bool:
    """Whether ``gguf.quants.quantize`` supports this type (tried once on one zero block)."""
    gguf = _gguf()
    if qtype not in _REQUANTIZES:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        import numpy as np

        try:
            gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
            _REQUANTIZES[qtype] = True
        except NotImplementedError:
            _REQUANTIZES[qtype] = False
    return _REQUANTIZES[qtype]


class GgufWeight(QuantWeight):
    def __init__(self, owner, name):
        super().__init__(owner, name)
        gguf = self._gguf = _gguf()
        if gguf is None:
            raise QuantError("a GGUF tensor, but the 'gguf' package is not installed "
                             "(pip install gguf)")
        self.qtype = gguf_type(self.param)
        if not isinstance(self.qtype, gguf.GGMLQuantizationType) or self.qtype not in gguf.GGML_QUANT_SIZES:
            raise QuantError(f"unknown GGUF quantization type {self.qtype!r}")

    @property
    def format(self) -> str:
        return f"GGUF {self.qtype.name}"

    @property
    def shape(self) -> tuple[int, ...]:
        p = self.param
        return tuple(int(d) for d in getattr(p, "tensor_shape", p.shape))

    def _rows_view(self) -> torch.Tensor:
        """The raw blocks as a plain uint8 (rows × bytes per row) view of the stored tensor."""
        raw = self.param.detach().as_subclass(torch.Tensor).view(torch.uint8)
        return raw.reshape(self.shape[0], -1)

    def merge_problem(self, rows=None) -> str | None:
        if not requantizes(self.qtype):
            return (f"{self.format} cannot be re-quantized (the gguf package has no {self.qtype.name} "
                    f"quantizer); use on-the-fly mode for this model")
        return None

    def stored(self, rows=None):
        return row_slice(self._rows_view(), rows).clone()

    def put(self, stored, rows=None) -> None:
        row_slice(self._rows_view(), rows).copy_(stored)

    def dequant_stored(self, stored, rows=None) -> torch.Tensor:
        n = stored.shape[0]
        flat = self._gguf.quants.dequantize(stored.cpu().numpy(), self.qtype)
        return torch.from_numpy(flat).reshape(n, *self.shape[1:]).to(stored.device, torch.float32)

    def requant(self, w: torch.Tensor, rows=None) -> None:
        n = w.shape[0]
        blocks = self._gguf.quants.quantize(w.detach().reshape(n, -1).float().cpu().numpy(), self.qtype)
        view = row_slice(self._rows_view(), rows)
        view.copy_(torch.from_numpy(blocks).reshape(view.shape))
