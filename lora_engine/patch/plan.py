"""From a wanted stack of LoRAs to a plan: for every target weight, which adapters at which strength.

A plan is a pure value; the difference between two plans is the set of target weights whose
contributions changed. Merged and on-the-fly patchers both consume plans, so switching
stacks touches only what changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from ..formats import LoraFile
from .rows import place_rows, take_rows


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
    adapter: object = field(compare=False, hash=False)

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


def misfit(adapter, shape: tuple[int, ...]) -> str | None:
    """Why this adapter cannot apply to a weight of ``shape`` (from tensor shapes only), or None."""
    import math

    from ..adapters.dora import dora_axis

    inner = getattr(adapter, "inner", adapter)
    natural = getattr(inner, "natural_shape", None)
    if natural is not None:
        try:
            ns = tuple(natural())
        except (RuntimeError, ValueError, IndexError):
            return "its tensors do not chain"
        if math.prod(ns) != math.prod(shape):
            return f"delta {list(ns)} vs weight {list(shape)}"
    if inner.kind == "ia3" and inner.weight.numel() not in shape[:2]:
        return f"ia3 vector of {inner.weight.numel()} vs weight {list(shape)}"
    if inner.kind == "oft" and not inner.is_butterfly and inner.blocks.shape[0] * inner.blocks.shape[-1] != shape[0]:
        return f"oft blocks {list(inner.blocks.shape)} vs weight {list(shape)}"
    if adapter is not inner:  # DoRA magnitude
        try:
            dora_axis(tuple(adapter.magnitude.shape), tuple(shape))
        except ValueError as e:
            return str(e)
    return None


def _has_bias_delta(adapter) -> bool:
    inner = getattr(adapter, "inner", adapter)
    return any(getattr(inner, f, None) is not None for f in ("up_bias", "diff_b", "b_norm"))


def _targets(keymap, name: str, dotted: str | None) -> tuple:
    find = getattr(keymap, "resolve", None)
    if find is not None:
        return find(name, dotted)
    hit = keymap.lookup(name, dotted)
    return () if hit is None else (hit,)


def _split(ma, target, height: int | None):
    """(the module's adapter for this target, why it does not fit or None). A target with
    ``delta_rows`` takes those rows of the module's delta."""
    if target.delta_rows is None:
        return ma, misfit(ma.adapter, target.shape)
    natural = getattr(getattr(ma.adapter, "inner", ma.adapter), "natural_shape", None)
    if natural is not None and height is not None:
        try:
            rows = tuple(natural())[0]
        except (RuntimeError, ValueError, IndexError):
            rows = None
        if rows is not None and rows != height:
            return ma, f"delta of {rows} rows, this model's layers under that name have {height} rows in all"
    try:
        part = take_rows(ma.adapter, target.delta_rows)
    except ValueError as e:
        return ma, str(e)
    split = replace(ma, adapter=part)
    return split, misfit(part, target.shape)


def resolve(lora: LoraFile, keymap) -> tuple:
    """Per module of a LoRA file and target it reaches: (name, its ``ModuleAdapter`` — for a target with
    ``delta_rows``, the part of it that lands there —, the keymap target or None, why the adapter does
    not fit that target or None). Depends on the file and the model only, not on the stack's weights,
    so an engine keeps it while the LoRA stays in the stack (``build_plan``'s ``resolved``): a change of
    weights then skips every lookup and shape check."""
    rows = []
    for name, ma in lora.modules.items():
        targets = _targets(keymap, name, ma.dotted)
        if not targets:
            rows.append((name, ma, None, None))
            continue
        height = max((t.delta_rows[1] for t in targets if t.delta_rows is not None), default=None)
        for target in targets:
            part, why = _split(ma, target, height)
            rows.append((name, part, target, why))
    return tuple(rows)


def _resolved(lora: LoraFile, keymap, cache: dict | None) -> tuple:
    if cache is None:
        return resolve(lora, keymap)
    hit = cache.get(id(lora))
    if hit is None or hit[0] is not lora or hit[1] is not keymap:
        hit = cache[id(lora)] = (lora, keymap, resolve(lora, keymap))
    return hit[2]


def _foreign(keymap, unmatched: list[str]) -> bool:
    """A LoRA for another diffusion-transformer family (or a DiT LoRA on an SD model, or the reverse) is
    refused whole: the few names two families share (``final_layer.linear``) would otherwise patch
    layers the LoRA was not trained for."""
    refuses = getattr(keymap, "refuses", None)
    return bool(unmatched) and refuses is not None and refuses(unmatched)


def build_plan(stack: list[StackEntry], keymap, resolved: dict | None = None) -> PatchPlan:
    """The plan for a wanted stack. ``resolved``: a dict the caller keeps between calls, holding
    ``resolve`` of each LoRA file (pruned to the stack's files here)."""
    plan = PatchPlan()
    contributions: dict[str, list[Contribution]] = {}
    for entry in stack:
        lf = entry.lora
        report = plan.reports.setdefault(entry.ident, LoraReport(lf.name, problems=list(lf.problems)))
        unmatched = []
        rows = _resolved(lf, keymap, resolved)
        refused = _foreign(keymap, [name for name, _, target, why in rows if target is None or why is not None])
        for name, ma, target, why in rows:
            if target is None:
                unmatched.append(name)
                continue
            if why is not None or refused:  # same name, other architecture (e.g. an SDXL LoRA on SD1)
                unmatched.append(name)
                if why is not None:
                    report.wrong_shape.append(f"{name}: {why}")
                continue
            strength = entry.te if target.component == "te" else entry.unet
            if entry.block_multiplier is not None:
                strength *= float(entry.block_multiplier(name))
            report.touched += 1
            if target.bias_key is None and _has_bias_delta(ma.adapter):
                report.problems.append(f"{name}: has a bias delta but the layer has no bias (bias part skipped)")
            if strength == 0.0:
                continue
            slot = slot_of(target)
            plan.targets[slot] = target
            contributions.setdefault(slot, []).append(
                Contribution(entry.ident, name, float(strength), _truncate(ma.adapter, entry.dyn)))
        report.unmatched = unmatched = list(dict.fromkeys(unmatched))
        if unmatched:
            report.diagnosis = keymap.diagnose(unmatched)
    _merge_overlaps(plan.targets, contributions)
    plan.contributions = {k: tuple(v) for k, v in contributions.items()}
    if resolved is not None:
        keep = {id(e.lora) for e in stack}
        for k in [k for k in resolved if k not in keep]:
            del resolved[k]
    return plan


def _merge_overlaps(targets: dict, contributions: dict) -> None:
    """Slots of one weight whose rows overlap (a fused LoRA on the whole ``qkv`` and a ``to_q`` LoRA on
    its first rows) become one slot over the rows they span, each contribution placed at its rows, so
    the weight gets one fp32 sum and one rounding. Disjoint row slices stay separate slots."""
    by_key: dict[str, list[str]] = {}
    for slot, t in targets.items():
        by_key.setdefault(t.weight_key, []).append(slot)
    for slots in by_key.values():
        if len(slots) < 2:
            continue
        spans = sorted((targets[s].rows or (0, targets[s].shape[0]), s) for s in slots)
        whole = next((targets[s] for s in slots if targets[s].rows is None), None)
        overlap = whole is not None or any(b[0][0] < a[0][1] for a, b in zip(spans, spans[1:]))
        if not overlap:
            continue
        if whole is not None:
            start, stop, merged = 0, whole.shape[0], whole
        else:
            start, stop = min(targets[s].rows[0] for s in slots), max(targets[s].rows[1] for s in slots)
            t0 = targets[slots[0]]
            merged = replace(t0, rows=(start, stop), shape=(stop - start, *t0.shape[1:]))
        placed = []
        for s in slots:
            rows = targets[s].rows or (start, stop)
            for c in contributions.pop(s):
                a = c.adapter if rows == (start, stop) else place_rows(c.adapter, (rows[0] - start, rows[1] - start), stop - start)
                placed.append(replace(c, adapter=a))
            del targets[s]
        slot = slot_of(merged)
        targets[slot] = merged
        contributions[slot] = placed


def changed_slots(old: PatchPlan, new: PatchPlan) -> set[str]:
    """Slots whose effective delta differs between two plans (added, removed or re-weighted)."""
    slots = set(old.contributions) | set(new.contributions)
    return {s for s in slots if old.signature(s) != new.signature(s)}
