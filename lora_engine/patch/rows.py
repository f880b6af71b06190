"""Adapters moved between a fused weight and its row blocks.

- ``take_rows(a, rows)``: the part of ``a``'s delta in ``rows`` (a fused ``qkv`` LoRA on a model whose
  q, k, v are separate layers). LoRA: the same down matrix and scale α/r, the up matrix's rows
  ``ΔW[rows] = s · up[rows] · down`` (never split down: it is shared by every block). Types whose delta
  does not read W₀ (LoHa, LoKr, full, norm) compute the whole delta and keep the rows. A DoRA
  normalised per output row keeps its magnitude's rows; one normalised per input column, or any
  type that reads W₀ (IA3, GLoRA, OFT), spans the whole fused weight and cannot be split.
- ``place_rows(a, rows, height)``: ``a``'s delta placed at ``rows`` of a weight ``height`` rows high, zero
  elsewhere (a q LoRA on a fused ``qkv`` Linear run as one side path; the q, k, v LoRAs of one fused
  weight merged as one slot). LoRA: a :class:`PlacedLoRA`, the up matrix padded with zero rows — still a
  plain LoRA of the same scale for every consumer — that remembers which rows are its own, so a merged
  write multiplies only those; other types compute their delta from W₀[rows].
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..adapters.base import Adapter, AdapterBase, Delta
from ..adapters.dora import DoRA, dora_axis
from ..adapters.lora import LoRA

_SHAPE_ONLY = ("lora", "loha", "lokr", "full", "norm")  # delta reads only W₀'s shape


class _Moved(AdapterBase):
    """What a moved adapter keeps from its source: type, scale, rank, label."""

    source: Adapter

    @property
    def kind(self) -> str:
        return self.source.kind

    @property
    def label(self) -> str:
        return self.source.label

    @property
    def scale(self) -> float:
        return self.source.scale

    @property
    def rank(self) -> int | None:
        return self.source.rank

    @property
    def has_bias_delta(self) -> bool:
        return self.source.has_bias_delta


@dataclass(frozen=True)
class PlacedLoRA(LoRA):
    """A LoRA whose up matrix is zero outside rows ``rows`` (its source's up padded to the whole weight):
    ΔW[rows] = s · up[rows] · down, ΔW = 0 elsewhere. ``own_up()`` is the unpadded part."""

    rows: tuple[int, int] = (0, 0)

    def own_up(self) -> torch.Tensor:
        return self.up[self.rows[0]:self.rows[1]]


@dataclass(frozen=True)
class RowsOf(_Moved):
    """Rows ``[start, stop)`` of another adapter's delta."""

    source: Adapter
    start: int
    stop: int

    def check(self) -> None:
        self.source.check()

    def natural_shape(self) -> tuple[int, ...]:
        full = tuple(self.source.natural_shape())
        return (self.stop - self.start, *full[1:])

    def bias_delta(self) -> torch.Tensor | None:
        b = self.source.bias_delta()
        return None if b is None else b.reshape(-1)[self.start:self.stop]

    def delta(self, base: torch.Tensor) -> Delta:
        full = torch.empty(self.source.natural_shape(), device="meta")
        d = self.source.delta(full)
        bias = None if d.bias is None else d.bias[self.start:self.stop]
        return Delta(d.weight[self.start:self.stop].reshape(base.shape), bias)


@dataclass(frozen=True)
class PlacedRows(_Moved):
    """Another adapter's delta at rows ``[start, stop)`` of a weight ``height`` rows high, zero elsewhere."""

    source: Adapter
    start: int
    stop: int
    height: int

    def natural_shape(self) -> tuple[int, ...] | None:
        own = self.source.natural_shape()
        return None if own is None else (self.height, *tuple(own)[1:])

    def bias_delta(self) -> torch.Tensor | None:
        b = self.source.bias_delta()
        if b is None:
            return None
        out = torch.zeros(self.height, dtype=torch.float32, device=b.device)
        out[self.start:self.stop] = b.reshape(-1)
        return out

    def check(self) -> None:
        self.source.check()

    def delta(self, base: torch.Tensor) -> Delta:
        d = self.source.delta(base[self.start:self.stop])
        w = torch.zeros(base.shape, dtype=torch.float32, device=d.weight.device)
        w[self.start:self.stop] = d.weight
        bias = None
        if d.bias is not None:
            bias = torch.zeros(self.height, dtype=torch.float32, device=d.bias.device)
            bias[self.start:self.stop] = d.bias.reshape(-1)
        return Delta(w, bias)


def take_rows(adapter, rows: tuple[int, int]):
    """The adapter of ``adapter``'s delta rows ``rows``; ValueError when that part cannot stand alone."""
    a, b = rows
    if isinstance(adapter, LoRA):
        return replace(adapter, up=adapter.up[a:b], up_bias=None if adapter.up_bias is None else adapter.up_bias[a:b])
    if isinstance(adapter, DoRA):
        full = tuple(adapter.inner.natural_shape())
        axis = adapter.axis if adapter.axis is not None else dora_axis(tuple(adapter.magnitude.shape), full)
        if axis != 0:
            raise ValueError("DoRA normalised per input column spans the whole fused weight; it cannot be split by rows")
        return DoRA(take_rows(adapter.inner, rows), adapter.magnitude[a:b], adapter.axis)
    if adapter.kind not in _SHAPE_ONLY or adapter.natural_shape() is None:
        raise ValueError(f"a {adapter.kind} delta depends on the whole fused weight; it cannot be split by rows")
    return RowsOf(adapter, a, b)


def place_rows(adapter, rows: tuple[int, int], height: int):
    """``adapter`` (fitting rows ``rows``) as an adapter of the whole ``height``-row weight."""
    a, b = rows
    if isinstance(adapter, PlacedLoRA):  # placed again (a slot's span onto the whole layer): shift its rows
        own, (a, b) = adapter.own_up(), (a + adapter.rows[0], a + adapter.rows[1])
        bias = None if adapter.up_bias is None else adapter.up_bias.reshape(-1)[adapter.rows[0]:adapter.rows[1]]
    elif isinstance(adapter, LoRA):
        own, bias = adapter.up, adapter.up_bias
    else:
        return PlacedRows(adapter, a, b, height)
    up = adapter.up.new_zeros((height, *adapter.up.shape[1:]))
    up[a:b] = own
    placed_bias = None
    if bias is not None:
        placed_bias = bias.new_zeros(height)
        placed_bias[a:b] = bias.reshape(-1)
    return PlacedLoRA(adapter.down, up, adapter.scale, adapter.mid, placed_bias, rows=(a, b))

