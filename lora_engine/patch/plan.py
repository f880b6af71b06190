"""From a wanted stack of LoRAs to a plan: for every target weight, which adapters at which strength.

A plan is a pure value; the difference between two plans is the set of target weights whose
contributions changed. Merged and on-the-fly patchers both consume plans, so switching
stacks touches only what changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..adapters.base import Adapter
from ..formats import LoraFile
from ..keymap.target import TargetMap


@dataclass(frozen=True)
class StackEntry:
    """One LoRA in the wanted stack: ``te``/``unet`` strengths (negative allowed), optional
    per-module multiplier (block weights) and A1111's ``dyn`` rank truncation."""

    lora: LoraFile
    te: float = 1.0
    unet: float = 1.0
    block_multiplier: Callable[[str], float] | None = None
    dyn: int | None = None
    key: str | None = None  # identity of the LoRA in the stack (defaults to its path)

    @property
    def ident(self) -> str:
        return self.key or self.lora.path


@dataclass(frozen=True)
class Contribution:
    """One adapter on one target at one strength. Equality = same LoRA, module, strength."""

    lora_id: str
    module_name: str
    strength: float
    adapter: Adapter = field(compare=False, hash=False)

    @property
    def signature(self) -> tuple:
        return (self.lora_id, self.module_name, self.strength)


@dataclass
class LoraReport:
    name: str
    touched: int = 0
    unmatched: list[str] = field(default_factory=list)  # no such module, or a module of another shape
    wrong_shape: list[str] = field(default_factory=list)
    diagnosis: str = ""
    problems: list[str] = field(default_factory=list)

    def line(self) -> str | None:
        """One warning line, or None when everything matched."""
        if not self.unmatched and not self.problems:
            return None
        parts = []
        if self.unmatched:
            part = f"{len(self.unmatched)} module(s) matched nothing in this model: {self.diagnosis}"
            if self.wrong_shape:
                part += f" ({len(self.wrong_shape)} have the name but another shape, e.g. {self.wrong_shape[0]})"
            parts.append(part)
        if self.problems:
            parts.append(f"{len(self.problems)} module(s) unusable ({self.problems[0]})")
        return f"{self.name}: " + "; ".join(parts)


@dataclass
class PatchPlan:
    targets: dict[str, object] = field(default_factory=dict)  # slot -> keymap Target
    contributions: dict[str, tuple[Contribution, ...]] = field(default_factory=dict)  # slot -> contributions
    reports: dict[str, LoraReport] = field(default_factory=dict)

    def signature(self, slot: str) -> tuple:
        return tuple(sorted(c.signature for c in self.contributions.get(slot, ())))


def slot_of(target) -> str:
    """Identity of a patched region: the weight key plus its row slice (fused q/k/v share a weight)."""
    return target.weight_key if target.rows is None else f"{target.weight_key}[{target.rows[0]}:{target.rows[1]}]"


def _truncate(adapter, dyn: int | None):
    if dyn and hasattr(adapter, "truncated"):
        return adapter.truncated(dyn)
    return adapter


def resolve(lora: LoraFile, keymap: TargetMap) -> tuple:
    """Per module of a LoRA file: (name, its ``ModuleAdapter``, the keymap target or None, why the
    adapter does not fit that target or None). Depends on the file and the model only, not on the
    stack's weights, so an engine keeps it while the LoRA stays in the stack (``build_plan``'s
    ``resolved``): a change of weights then skips every lookup and shape check."""
    rows = []
    for name, ma in lora.modules.items():
        target = keymap.lookup(name, ma.dotted)
        rows.append((name, ma, target, None if target is None else ma.adapter.misfit(tuple(target.shape))))
    return tuple(rows)


def _resolved(lora: LoraFile, keymap: TargetMap, cache: dict | None) -> tuple:
    if cache is None:
        return resolve(lora, keymap)
    hit = cache.get(id(lora))
    if hit is None or hit[0] is not lora or hit[1] is not keymap:
        hit = cache[id(lora)] = (lora, keymap, resolve(lora, keymap))
    return hit[2]


def build_plan(stack: list[StackEntry], keymap: TargetMap, resolved: dict | None = None) -> PatchPlan:
    """The plan for a wanted stack. ``resolved``: a dict the caller keeps between calls, holding
    ``resolve`` of each LoRA file (pruned to the stack's files here)."""
    plan = PatchPlan()
    contributions: dict[str, list[Contribution]] = {}
    for entry in stack:
        lf = entry.lora
        report = plan.reports.setdefault(entry.ident, LoraReport(lf.name, problems=list(lf.problems)))
        unmatched = []
        for name, ma, target, why in _resolved(lf, keymap, resolved):
            if target is None:
                unmatched.append(name)
                continue
            if why is not None:  # same name, other architecture (e.g. an SDXL LoRA on SD1)
                unmatched.append(name)
                report.wrong_shape.append(f"{name}: {why}")
                continue
            strength = entry.te if target.component == "te" else entry.unet
            if entry.block_multiplier is not None:
                strength *= float(entry.block_multiplier(name))
            report.touched += 1
            if target.bias_key is None and ma.adapter.has_bias_delta:
                report.problems.append(f"{name}: has a bias delta but the layer has no bias (bias part skipped)")
            if strength == 0.0:
                continue
            slot = slot_of(target)
            plan.targets[slot] = target
            contributions.setdefault(slot, []).append(
                Contribution(entry.ident, name, float(strength), _truncate(ma.adapter, entry.dyn)))
        report.unmatched = unmatched
        if unmatched:
            report.diagnosis = keymap.diagnose(unmatched)
    plan.contributions = {k: tuple(v) for k, v in contributions.items()}
    if resolved is not None:
        keep = {id(e.lora) for e in stack}
        for k in [k for k in resolved if k not in keep]:
            del resolved[k]
    return plan


def changed_slots(old: PatchPlan, new: PatchPlan) -> set[str]:
    """Slots whose effective delta differs between two plans (added, removed or re-weighted)."""
    slots = set(old.contributions) | set(new.contributions)
    return {s for s in slots if old.signature(s) != new.signature(s)}
