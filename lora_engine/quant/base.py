"""What every quantized weight format offers the engine.

A ``QuantWeight`` stands for one layer's stored weight (a Parameter held by ``owner`` under ``name``):
    dequant(rows)          the effective weight W = D(stored) as fp32 (rows: a row range of it, or all)
    requant(W, rows)       store W in the same format (same dtype / quant type / block layout / scale)
    stored(rows)           an exact copy of the stored bytes (and scales) of those rows
    put(stored, rows)      write such a copy back, bit for bit
    dequant_stored(s)      D of a copy (the W₀ a merge starts from: always the backup, never the live
                           weight, so any number of merges followed by ``put`` gives the original bits)
``merge_problem()`` says why merging into this layer is impossible (a format with no quantizer), or None.
"""
from __future__ import annotations

import torch

from ..errors import LoraEngineError


class QuantError(LoraEngineError):
    """A quantized weight the engine cannot read or write (unknown quant type, unsupported layout)."""


class QuantWeight:
    format: str = "?"

    def __init__(self, owner: torch.nn.Module, name: str):
        self.owner, self.name = owner, name

    @property
    def param(self) -> torch.Tensor:
        return self.owner._parameters[self.name]

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape (what the weight is as a matrix / kernel, not its packed storage)."""
        return tuple(self.param.shape)

    def merge_problem(self, rows: tuple[int, int] | None = None) -> str | None:
        return None

    def dequant(self, rows=None) -> torch.Tensor:
        return self.dequant_stored(self.stored(rows), rows)

    def dequant_stored(self, stored, rows=None) -> torch.Tensor:
        raise NotImplementedError

    def requant(self, w: torch.Tensor, rows=None) -> None:
        raise NotImplementedError

    def stored(self, rows=None):
        raise NotImplementedError

    def put(self, stored, rows=None) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.format} {list(self.shape)}"


def row_slice(t: torch.Tensor, rows) -> torch.Tensor:
    return t if rows is None else t[rows[0]:rows[1]]
