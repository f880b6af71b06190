"""LoRA tensors kept on the model's device while their LoRA is in the stack.

A merged write or an on-the-fly side path needs each adapter's tensors where the weight is. Parsed
LoRAs live in host memory (the LRU cache), so moving them at every apply would cross the host link once
per change for every factor: for a rank-32 stack that is a few per cent of the touched bytes per LoRA,
over a link ~100× slower than a GPU's own memory, which alone would cost many times the memory-bound
time of a merge. So each adapter moves once per device, in its own dtype (a rank-32 LoRA: about its
file size), and the copy is dropped when its LoRA leaves the stack. CPU weights use the adapters as
they are; nothing is copied.
"""
from __future__ import annotations

import dataclasses

import torch


def on_device(adapter, device: torch.device):
    """A copy of a frozen adapter dataclass with its tensors on ``device`` (dtypes kept); nested
    adapter dataclasses (DoRA's inner) are moved too."""
    changes = {}
    for f in dataclasses.fields(adapter):
        v = getattr(adapter, f.name)
        if isinstance(v, torch.Tensor):
            changes[f.name] = v.to(device)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            changes[f.name] = on_device(v, device)
    return dataclasses.replace(adapter, **changes)


def _tensors(adapter):
    for f in dataclasses.fields(adapter):
        v = getattr(adapter, f.name)
        if isinstance(v, torch.Tensor):
            yield v
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            yield from _tensors(v)


class DeviceFactors:
    """{(adapter, device): the adapter's copy on that device}, for the adapters of the current plan."""

    def __init__(self):
        self._copies: dict[tuple[int, torch.device], tuple[object, object]] = {}  # -> (source, copy)

    def get(self, adapter, device: torch.device):
        """``adapter`` itself when its tensors are already on ``device`` (always for CPU weights),
        else its cached copy there."""
        device = torch.device(device)
        if device.type == "cpu" or all(t.device == device for t in _tensors(adapter)):
            return adapter
        key = (id(adapter), device)
        hit = self._copies.get(key)
        if hit is None or hit[0] is not adapter:
            hit = self._copies[key] = (adapter, on_device(adapter, device))
        return hit[1]

    def retain(self, adapters) -> int:
        """Drop the copies of adapters not in ``adapters`` (the new plan's); returns how many."""
        keep = {id(a) for a in adapters}
        gone = [k for k, (src, _) in self._copies.items() if id(src) not in keep]
        for k in gone:
            del self._copies[k]
        return len(gone)

    def clear(self) -> None:
        self._copies.clear()

    def __len__(self) -> int:
        return len(self._copies)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, copy in self._copies.values() for t in _tensors(copy))


def plan_adapters(plan) -> list:
    """Every adapter a plan uses (once each)."""
    seen: dict[int, object] = {}
    for contribs in plan.contributions.values():
        for c in contribs:
            seen.setdefault(id(c.adapter), c.adapter)
    return list(seen.values())
