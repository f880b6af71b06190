"""Merged mode: add the stack's deltas into the weights in place; restore by copying backups.

Only touched slots are backed up, once, in their own dtype (on CPU or on the weight's device).
A slot's new value is always computed from W₀: W = cast(W₀ + Σ m·ΔW), one add, one cast, so any
sequence of stacks followed by ``restore()`` gives back the original bits. On a slot's first write the
live weight still holds W₀ and is read directly (the backup on another device is not copied back);
later writes read the backup. The adapters' tensors are moved to a GPU weight's device once per LoRA
(``DeviceFactors``), not at every write.

An ``apply`` is all or nothing. A slot's value is a deterministic function of W₀ and its contributions,
so a failure halfway is undone by recomputing every slot touched so far from the previous plan (the same
bits; no copy of the pre-apply values is held). A written weight that is not finite (an fp32 sum that
overflowed, or a finite sum beyond fp16's range) is refused: that slot keeps its previous value. The check
is one sum of each written weight in its dtype (see ``finite``), read back for all slots at the end of the
apply (one wait for a GPU's queue, not one per slot). ``restore`` walks the backups, not the plan.

Quantized weights (scaled fp8, GGUF blocks, bitsandbytes 4-bit; see ``lora_engine.quant``) are merged
through their format: W = Q(D(stored₀) + Σ m·ΔW) with the same format, scale and block layout; the
backup is the exact stored bytes (and scales) of the touched rows. A layer whose format cannot be
re-quantized, or cannot be read at all, is left as it was (one line in the LoRA's report); the LoRA
is applied to every other layer. Plain fp8 weights take the common path (one round-to-nearest cast).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from ..errors import PatchError
from ..finite import finite_probes, nonfinite, probe
from ..quant import Fp8Weight, QuantError, QuantWeight, is_quantized, quant_weight_at
from .delta import merged_weight, summed_delta
from .device_factors import DeviceFactors, plan_adapters
from .plan import PatchPlan, changed_slots, failure_line, keeping, refuse


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


def _plus(delta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """base + delta in fp32, into ``delta`` (a fresh tensor from ``summed_delta``) when shapes allow:
    the same bits as ``base + delta``, without allocating another full-size buffer."""
    return delta.add_(base) if delta.shape == base.shape else base + delta


class Backup(NamedTuple):
    """A slot's original weight (and bias) region, and the target that locates it in the model. For a
    quantized weight, ``weight`` is its format's exact copy of the stored bytes (``quant.stored``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    target: object
    quant: QuantWeight | None = None

    def original(self) -> torch.Tensor:
        """W₀ as a tensor the delta functions read (fp32 for a quantized weight)."""
        return self.weight if self.quant is None else self.quant.dequant_stored(self.weight, self.target.rows)


def _copy(t: torch.Tensor, dev) -> torch.Tensor:
    """A real copy (a host's tensor subclass may answer ``clone`` with itself, as ComfyUI-GGUF's does)."""
    return t.to(dev, copy=True) if dev else torch.Tensor.clone(t)


def quantized(root: torch.nn.Module, target) -> QuantWeight | None:
    """The quantized format merged mode must go through for this target (None for plain dtypes, fp8
    included); raises ``QuantError`` for a weight it cannot read."""
    if not is_quantized(_param(root, target.weight_key)):  # the common case, without a module lookup
        return None
    q = quant_weight_at(root, target.weight_key)
    return None if q is None or type(q) is Fp8Weight else q


@dataclass
class MergedPatcher:
    root: torch.nn.Module
    backup_device: str = "cpu"  # "cpu" or "same"
    plan: PatchPlan = field(default_factory=PatchPlan)  # what is on the model (refused slots as they were)
    backups: dict[str, Backup] = field(default_factory=dict)
    stats: PatchStats = field(default_factory=PatchStats)
    device_factors: bool = True  # keep the stack's adapter tensors on a GPU weight's device
    adapters_on_device: DeviceFactors = field(default_factory=DeviceFactors, repr=False)
    _scratch: torch.Tensor | None = field(default=None, repr=False)
    _scratch_size: int = field(default=0, repr=False)

    def _backup(self, slot: str, target) -> Backup:
        if slot not in self.backups:
            dev = None if self.backup_device == "same" else torch.device(self.backup_device)
            q = quantized(self.root, target)
            b = None
            if target.bias_key is not None:
                try:
                    b = target.region(_param(self.root, target.bias_key)).detach()
                except (KeyError, AttributeError):
                    b = None
            if q is not None:
                w = q.stored(target.rows)  # already a copy, on the weight's device
                w = w if dev is None else tuple_to(w, dev)
            else:
                w = _copy(target.region(_param(self.root, target.weight_key)).detach(), dev)
            self.backups[slot] = Backup(w, None if b is None else _copy(b, dev), target, q)
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
    def _write(self, slot: str, target, contributions) -> list[torch.Tensor]:
        """W = cast(W₀ + Σ m·ΔW) (and b likewise) into the model; returns the probes of what was written
        (``finite.probe``, not read back: see ``_refuse_non_finite``)."""
        first = slot not in self.backups
        backup = self._backup(slot, target)
        if backup.quant is not None:
            return self._write_quantized(backup, contributions)
        w0, b0 = backup.weight, backup.bias
        w = target.region(_param(self.root, target.weight_key))
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
        probes = []
        if new is not None:
            if new is not w:
                w.copy_(new)  # copy_ casts with the same rounding as .to(w.dtype)
            probes.append(probe(w))  # of the cast weight: fp16 overflows at 65504
            self.stats.bytes_written += w.numel() * w.element_size()
        probes += self._write_bias(target, db, b0)
        self.stats.slots_written += 1
        return [p for p in probes if p is not None]

    def _write_bias(self, target, db, b0) -> list:
        if db is None or target.bias_key is None:
            return []
        try:
            b = target.region(_param(self.root, target.bias_key))
        except (KeyError, AttributeError):
            return []
        b.copy_(_plus(db, b0.to(b.device, torch.float32)))
        return [probe(b)]

    def _write_quantized(self, backup: Backup, contributions) -> list[torch.Tensor]:
        """W = Q(D(stored₀) + Σ m·ΔW) in the weight's own format; the probe is of the fp32 sum (a NaN
        or Inf there would otherwise hide in a block's scale)."""
        q, target = backup.quant, backup.target
        w0 = backup.original()
        if self.device_factors and w0.device.type != "cpu":
            contributions = [replace(c, adapter=self.adapters_on_device.get(c.adapter, w0.device)) for c in contributions]
        new, db = merged_weight(contributions, w0, out=w0)
        probes = []
        if new is not None:
            probes.append(probe(new))
            q.requant(new, target.rows)
            self.stats.bytes_written += new.numel()  # fp32 elements requantized
        probes += self._write_bias(target, db, backup.bias)
        self.stats.slots_written += 1
        return [p for p in probes if p is not None]

    @torch.no_grad()
    def _put_back(self, slot: str) -> None:
        """Copy a slot's originals into the model (the backup is kept)."""
        w0, b0, target, q = self.backups[slot]
        if q is not None:
            q.put(w0, target.rows)
        else:
            target.region(_param(self.root, target.weight_key)).copy_(w0)
        if b0 is not None:
            target.region(_param(self.root, target.bias_key)).copy_(b0)

    def _previous(self, slot: str, old: PatchPlan) -> None:
        """Give a slot the value ``old`` gave it: cast(W₀ + Σ_old), recomputed bit for bit from the
        backup (the same inputs through the same code), or W₀."""
        if slot in old.contributions:
            self._write(slot, old.targets[slot], old.contributions[slot])
        elif slot in self.backups:
            self._put_back(slot)

    def apply(self, new_plan: PatchPlan) -> PatchStats:
        """Move the model from the current plan to ``new_plan``, touching only changed slots.

        All or nothing: on any exception every slot touched so far gets its value from before the call
        back and a ``PatchError`` names the LoRA file and module. A slot whose new value is not finite
        keeps its previous value (noted in the LoRAs' reports); the others are applied."""
        self.stats = PatchStats()
        old = self.plan
        # restores first: a slot written next may cover the same rows of a fused weight and back them up
        changed = sorted(changed_slots(old, new_plan), key=lambda s: (s in new_plan.contributions, s))
        self._scratch_size = max((int(torch.Size(new_plan.targets[s].shape).numel()) for s in changed
                                  if s in new_plan.contributions), default=0)
        touched: list[str] = []
        fresh = set()  # slots first backed up by this call
        probes: list[tuple[str, torch.Tensor]] = []
        refused: set[str] = set()
        try:
            for slot in changed:
                touched.append(slot)
                if slot not in new_plan.contributions:
                    if slot in self.backups:
                        self._put_back(slot)
                    continue
                why = self._unmergeable(slot, new_plan.targets[slot])
                if why is not None:
                    refused.add(slot)
                    refuse(new_plan, slot, why)
                    self._previous(slot, old)
                    continue
                if slot not in self.backups:
                    fresh.add(slot)
                probes += [(slot, p) for p in self._write(slot, new_plan.targets[slot], new_plan.contributions[slot])]
            refused |= self._refuse_non_finite(probes, new_plan, old)
        except BaseException as e:
            message = self._failure(new_plan, touched[-1], e) if isinstance(e, Exception) and touched else None
            self._roll_back(touched, fresh, old)
            if message is None:
                raise
            raise PatchError(message) from e
        finally:
            self._scratch = None  # held for one apply only: steady RAM stays the backups
        for slot in touched:  # commit: slots that left the plan (or were refused on first write) lose their backup
            if slot not in new_plan.contributions or (slot in refused and slot not in old.contributions):
                if self.backups.pop(slot, None) is not None and slot not in refused:
                    self.stats.slots_restored += 1
        self.plan = keeping(old, new_plan, refused)
        if len(self.adapters_on_device):
            self.adapters_on_device.retain(plan_adapters(self.plan))  # LoRAs that left the stack leave the device
        return self.stats

    def _unmergeable(self, slot: str, target) -> str | None:
        """Why a slot's weight cannot take a merge (its quantized format cannot be read or written), or None."""
        if slot in self.backups:
            q = self.backups[slot].quant
        else:
            try:
                q = quantized(self.root, target)
            except QuantError as e:
                return str(e)
        why = None if q is None else q.merge_problem(target.rows)
        return None if why is None else f"{target.weight_key}: {why}"

    def _refuse_non_finite(self, probes: list, new_plan: PatchPlan, old: PatchPlan) -> set[str]:
        """Slots whose written weight or bias holds NaN/Inf where the original did not get their previous
        value back; the LoRAs that caused it get a note. The probes are read back together (one wait
        for a GPU's queue per apply, not one per slot)."""
        suspects = {slot for (slot, _), ok in zip(probes, finite_probes([p for _, p in probes])) if not ok}
        refused = set()
        for slot in sorted(suspects):
            backup = self.backups[slot]
            if backup.quant is not None:
                worse = _worse(backup.quant.dequant(backup.target.rows), backup.original())
            else:
                w = backup.target.region(_param(self.root, backup.target.weight_key))
                worse = _worse(w, backup.weight)
            if not worse and backup.bias is not None:
                worse = _worse(backup.target.region(_param(self.root, backup.target.bias_key)), backup.bias)
            if worse:
                refused.add(slot)
                refuse(new_plan, slot, "the merged weight would not be finite",
                       self._overflowing(slot, new_plan.contributions[slot]))
                self._previous(slot, old)
        return refused

    def _overflowing(self, slot: str, contributions) -> list:
        """The contributions that alone make the slot's weight non-finite (all of them when only their
        sum does). Runs only for a refused slot."""
        if len(contributions) == 1:
            return list(contributions)
        w0 = self.backups[slot].original()
        dtype = w0.dtype if self.backups[slot].quant is None else torch.float32
        alone = [c for c in contributions
                 if (w := merged_weight([c], w0)[0]) is not None and nonfinite(w.to(dtype))]
        return alone or list(contributions)

    def _roll_back(self, touched: list[str], fresh: set, old: PatchPlan) -> None:
        """Every slot in ``touched`` back to its value under ``old``; backups made for them dropped."""
        lost = []
        for slot in reversed(touched):
            try:
                self._previous(slot, old)
            except Exception:  # cannot recompute it (e.g. out of memory): the original is the safe value
                if slot in self.backups:
                    self._put_back(slot)
                    lost.append(slot)
            if slot in fresh or slot in lost:
                self.backups.pop(slot, None)
        if lost:
            self.plan = PatchPlan(old.targets, {s: c for s, c in old.contributions.items() if s not in lost},
                                  old.reports)
        if len(self.adapters_on_device):
            self.adapters_on_device.retain(plan_adapters(self.plan))

    def _failure(self, plan: PatchPlan, slot: str, error: Exception) -> str:
        """One line: the LoRA file and module that failed on ``slot``, and why."""
        contributions = plan.contributions.get(slot, ())
        culprit = _culprit(contributions, self.backups.get(slot)) if len(contributions) > 1 else None
        named = [culprit] if culprit is not None else list(contributions)
        return failure_line(plan, slot, named, error, f"cannot be merged into {slot}")

    @torch.no_grad()
    def restore(self) -> PatchStats:
        """Put every backed-up weight back, bit for bit, whatever the plan says, and forget the plan."""
        self.stats = PatchStats()
        for slot in list(self.backups):
            self._put_back(slot)
            del self.backups[slot]
            self.stats.slots_restored += 1
        self.plan = PatchPlan()
        self.adapters_on_device.clear()
        return self.stats


def _worse(t: torch.Tensor, original: torch.Tensor | None) -> bool:
    """Whether writing made ``t`` non-finite (a base that already held NaN/Inf does not count)."""
    return nonfinite(t) and not nonfinite(original)


def _culprit(contributions, backup: Backup | None):
    """The first contribution whose delta fails on its own (None when none does)."""
    if backup is None:
        return None
    for c in contributions:
        try:
            summed_delta([c], backup.original())
        except Exception:
            return c
    return None


def tuple_to(stored, dev):
    """A quantized backup (a tensor, or a tuple of tensors and format state) moved to ``dev``."""
    if isinstance(stored, torch.Tensor):
        return stored.to(dev)
    if isinstance(stored, tuple):
        return tuple(tuple_to(s, dev) for s in stored)
    return stored
