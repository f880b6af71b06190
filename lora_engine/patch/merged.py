"""Merged mode: add the stack's deltas into the weights in place; restore by copying backups.

Only touched slots are backed up, once, in their own dtype (on CPU or on the weight's device).
A slot's new value is always computed from W₀: W = cast(W₀ + Σ m·ΔW), one add, one cast, so any
sequence of stacks followed by ``restore()`` gives back the original bits. On a slot's first write the
live weight still holds W₀ and is read directly (the backup on another device is not copied back);
later writes read the backup. The adapters' tensors are moved to a GPU weight's device once per LoRA
(``DeviceFactors``), not at every write.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .delta import merged_weight
from .device_factors import DeviceFactors, plan_adapters
from .plan import PatchPlan, changed_slots


@dataclass
class PatchStats:
    """Counts of what the last ``apply`` did (used by tests and benchmarks)."""

    slots_written: int = 0
    slots_restored: int = 0
    bytes_written: int = 0


def _param(root: torch.nn.Module, key: str) -> torch.Tensor:
    """The tensor at a state-dict key, looked up afresh each time (a host may replace a module between
    two applies) but through the registries directly: ``get_submodule`` costs tens of microseconds per
    key through ``Module.__getattr__``, which adds up over a thousand slots per change."""
    *path, name = key.split(".")
    module = root
    for part in path:
        child = module._modules.get(part)
        module = child if child is not None else getattr(module, part)
    p = module._parameters.get(name) if name in module._parameters else getattr(module, name, None)
    if p is None:
        p = module._buffers.get(name)
    if not isinstance(p, torch.Tensor):
        raise KeyError(key)
    return p


def _region(t: torch.Tensor, rows):
    return t if rows is None else t[rows[0]:rows[1]]


def _plus(delta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """base + delta in fp32, into ``delta`` (a fresh tensor from ``summed_delta``) when shapes allow:
    the same bits as ``base + delta``, without allocating another full-size buffer."""
    return delta.add_(base) if delta.shape == base.shape else base + delta


@dataclass
class MergedPatcher:
    root: torch.nn.Module
    backup_device: str = "cpu"  # "cpu" or "same"
    plan: PatchPlan = field(default_factory=PatchPlan)
    backups: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    stats: PatchStats = field(default_factory=PatchStats)
    device_factors: bool = True  # keep the stack's adapter tensors on a GPU weight's device
    adapters_on_device: DeviceFactors = field(default_factory=DeviceFactors, repr=False)
    _scratch: torch.Tensor | None = field(default=None, repr=False)
    _scratch_size: int = field(default=0, repr=False)

    def _backup(self, slot: str, target) -> tuple[torch.Tensor, torch.Tensor | None]:
        if slot not in self.backups:
            dev = None if self.backup_device == "same" else torch.device(self.backup_device)
            w = _region(_param(self.root, target.weight_key), target.rows).detach()
            b = None
            if target.bias_key is not None:
                try:
                    b = _region(_param(self.root, target.bias_key), target.rows).detach()
                except (KeyError, AttributeError):
                    b = None
            self.backups[slot] = (w.to(dev, copy=True) if dev else w.clone(),
                                  None if b is None else (b.to(dev, copy=True) if dev else b.clone()))
        return self.backups[slot]

    def _scratch_for(self, w: torch.Tensor) -> torch.Tensor:
        """An fp32 buffer of w's shape, reused across the slots of one ``apply`` (a fresh full-size
        temporary per slot costs page faults at every call for large layers)."""
        n = w.numel()
        buf = self._scratch
        if buf is None or buf.numel() < n or buf.device != w.device:  # sized once per apply
            size = max(n, self._scratch_size)
            self._scratch = None  # free the old one first
            buf = self._scratch = torch.empty(size, dtype=torch.float32, device=w.device)
        return buf[:n].view(w.shape)

    @torch.no_grad()
    def _write(self, slot: str, target, contributions) -> None:
        first = slot not in self.backups
        w0, b0 = self._backup(slot, target)
        w = _region(_param(self.root, target.weight_key), target.rows)
        if first and (w0.device != w.device or w.dtype != torch.float32):
            w0 = w.detach()  # still W₀: read it where it is (its sum goes through the scratch buffer)
        else:
            w0 = w0.to(w.device)  # no copy when the backup lives on the weight's device
        if self.device_factors and w.device.type != "cpu":
            contributions = [replace(c, adapter=self.adapters_on_device.get(c.adapter, w.device)) for c in contributions]
        # an fp32 weight takes ΔW straight from the GEMM, then += W0; other dtypes sum into a reused
        # fp32 buffer (W0 upcast exactly in the add) and get one rounding copy_
        if w.dtype == torch.float32 and w.is_contiguous() and w.data_ptr() != w0.data_ptr():
            out = w
        else:
            out = self._scratch_for(w)
        new, db = merged_weight(contributions, w0, out=out)
        if new is not None:
            if new is not w:
                w.copy_(new)  # copy_ casts with the same rounding as .to(w.dtype)
            self.stats.bytes_written += w.numel() * w.element_size()
        if db is not None and target.bias_key is not None:
            try:
                b = _region(_param(self.root, target.bias_key), target.rows)
            except (KeyError, AttributeError):
                b = None
            if b is not None:
                b.copy_(_plus(db, b0.to(b.device, torch.float32)))
        self.stats.slots_written += 1

    @torch.no_grad()
    def _restore_slot(self, slot: str) -> None:
        target = self.plan.targets.get(slot)
        w0, b0 = self.backups.pop(slot)
        if target is None:
            return
        _region(_param(self.root, target.weight_key), target.rows).copy_(w0)
        if b0 is not None:
            _region(_param(self.root, target.bias_key), target.rows).copy_(b0)
        self.stats.slots_restored += 1

    def apply(self, new_plan: PatchPlan) -> PatchStats:
        """Move the model from the current plan to ``new_plan``, touching only changed slots."""
        self.stats = PatchStats()
        changed = changed_slots(self.plan, new_plan)
        self._scratch_size = max((int(torch.Size(new_plan.targets[s].shape).numel()) for s in changed
                                  if s in new_plan.contributions), default=0)
        for slot in sorted(changed, key=lambda s: s in new_plan.contributions):  # restores first: a slot
            if slot not in new_plan.contributions:  # written next may cover the same rows and back them up
                if slot in self.backups:
                    self._restore_slot(slot)
            else:
                self._write(slot, new_plan.targets[slot], new_plan.contributions[slot])
        # keep targets of removed slots out, of current slots in
        self.plan = new_plan
        self._scratch = None  # held for one apply only: steady RAM stays the backups
        if len(self.adapters_on_device):
            self.adapters_on_device.retain(plan_adapters(new_plan))  # LoRAs that left the stack leave the device
        return self.stats

    def restore(self) -> PatchStats:
        """Put every touched weight back, bit for bit, and forget the plan."""
        return self.apply(PatchPlan())
