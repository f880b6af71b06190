"""From a wanted stack of LoRAs to a plan: for every target weight, which adapters at which strength.

A plan is a pure value; the difference between two plans is the set of target weights whose
contributions changed. Merged and on-the-fly patchers both consume plans, so switching
stacks touches only what changed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

from ..adapters.base import Adapter
from ..formats import LoraFile
from ..keymap.target import TargetMap
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
    adapter: Adapter = field(compare=False, hash=False)

    @property
    def signature(self) -> tuple:
        return (self.lora_id, self.module_name, self.strength)


@dataclass
class LoraReport:
    name: str
    touched: int = 0  # modules that fit this model
    unmatched: list[str] = field(default_factory=list)  # no such module, or a module of another shape
    wrong_shape: list[str] = field(default_factory=list)
    diagnosis: str = ""
    problems: list[str] = field(default_factory=list)
    path: str = ""  # the LoRA file
    foreign: str | None = None  # the model family it was made for, when not this model's
    skipped: bool = False  # foreign and not forced: nothing of it was applied
    refused: list[str] = field(default_factory=list)  # "module: why" left unchanged (non-finite result)
    notes: list[str] = field(default_factory=list)  # e.g. a strength outside the sane range

    def line(self) -> str | None:
        """One warning line, or None when everything matched and applied."""
        parts = []
        if self.unmatched:
            part = f"{len(self.unmatched)} module(s) matched nothing in this model: {self.diagnosis}"
            if self.wrong_shape:
                part += f" ({len(self.wrong_shape)} have the name but another shape, e.g. {self.wrong_shape[0]})"
            parts.append(part)
        if self.skipped:
            parts.append(f"nothing of it was applied (made for {self.foreign}; forcing it applies the "
                         f"{self.touched} module(s) that fit)")
        if self.problems:
            parts.append(f"{len(self.problems)} module(s) unusable ({self.problems[0]})")
        if self.refused:
            parts.append(f"{len(self.refused)} module(s) left as they were ({self.refused[0]})")
        parts.extend(self.notes)
        return f"{self.name}: " + "; ".join(parts) if parts else None


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
        return ma, ma.adapter.misfit(tuple(target.shape))
    if height is not None:
        try:
            rows = (ma.adapter.natural_shape() or (None,))[0]
        except (RuntimeError, ValueError, IndexError):
            rows = None
        if rows is not None and rows != height:
            return ma, f"delta of {rows} rows, this model's layers under that name have {height} rows in all"
    try:
        part = take_rows(ma.adapter, target.delta_rows)
    except ValueError as e:
        return ma, str(e)
    split = replace(ma, adapter=part)
    return split, part.misfit(tuple(target.shape))


def resolve(lora: LoraFile, keymap: TargetMap) -> tuple:
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


def _resolved(lora: LoraFile, keymap: TargetMap, cache: dict | None) -> tuple:
    if cache is None:
        return resolve(lora, keymap)
    hit = cache.get(id(lora))
    if hit is None or hit[0] is not lora or hit[1] is not keymap:
        hit = cache[id(lora)] = (lora, keymap, resolve(lora, keymap))
    return hit[2]


_IMAGE_INPUTS = ("img_in", "x_embedder")  # Flux's image-latent input layer (native, diffusers)


def _wider_input(ma, target) -> str | None:
    """The line for a module whose delta reads more input channels than the layer has (the ``img_in`` of a
    Flux Canny/Depth control LoRA, 128 wide: the latents plus the control image's latents), else None."""
    try:
        shape = tuple(ma.adapter.natural_shape() or ())
    except (RuntimeError, ValueError, IndexError):
        return None
    have = tuple(target.shape)
    layer = target.weight_key.rpartition(".")[0]
    if layer.rpartition(".")[2] not in _IMAGE_INPUTS:  # elsewhere a wider input is another model's layer
        return None
    if len(shape) != 2 or len(have) != 2 or shape[0] != have[0] or shape[1] <= have[1]:
        return None
    return (f"module {ma.dotted or ma.name} reads {shape[1]} input channels, this model's {layer} takes {have[1]}: "
            f"this is a control LoRA (as Flux Canny/Depth) that needs a model whose input layer also takes the "
            f"{shape[1] - have[1]} control-image channels (e.g. FLUX.1 Canny/Depth-dev, or a pipeline feeding a "
            f"control image); that layer was left as it was")


MAX_STRENGTH = 100.0  # |strength| above this is almost surely a typo (``<lora:x:1e308>``): warned about


def _strength_note(entry: StackEntry, max_strength: float) -> str | None:
    odd = [f"{part} {w:g}" for part, w in (("te", entry.te), ("unet", entry.unet))
           if not math.isfinite(w) or abs(w) > max_strength]
    if not odd:
        return None
    return f"strength {', '.join(odd)} is outside ±{max_strength:g} (weights may overflow)"


def build_plan(stack: list[StackEntry], keymap: TargetMap, resolved: dict | None = None, force_foreign: bool = False,
               max_strength: float = MAX_STRENGTH) -> PatchPlan:
    """The plan for a wanted stack. ``resolved``: a dict the caller keeps between calls, holding
    ``resolve`` of each LoRA file (pruned to the stack's files here). A LoRA whose unmatched names say
    it was made for another model family (an SDXL LoRA on SD1) contributes nothing unless
    ``force_foreign``: the modules whose names and shapes happen to fit would change the model into
    neither. A strength beyond ``±max_strength`` is applied, with a note in the report."""
    plan = PatchPlan()
    contributions: dict[str, list[Contribution]] = {}
    for entry in stack:
        lf = entry.lora
        report = plan.reports.setdefault(entry.ident, LoraReport(lf.name, problems=list(lf.problems), path=lf.path))
        if (note := _strength_note(entry, max_strength)) is not None:
            report.notes.append(note)
        unmatched, mine = [], []
        for name, ma, target, why in _resolved(lf, keymap, resolved):
            if target is None:
                unmatched.append(name)
                continue
            if why is not None and (note := _wider_input(ma, target)) is not None:
                report.notes.append(note)
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
            mine.append((target, Contribution(entry.ident, name, float(strength), _truncate(ma.adapter, entry.dyn))))
        report.unmatched = unmatched = list(dict.fromkeys(unmatched))
        if unmatched:
            report.diagnosis = keymap.diagnose(unmatched)
            report.foreign = keymap.foreign_family(unmatched)
            report.skipped = report.foreign is not None and not force_foreign
        if report.skipped:
            continue
        if report.touched:
            report.notes[:0] = getattr(lf, "notes", ())
        for target, c in mine:
            slot = slot_of(target)
            plan.targets[slot] = target
            contributions.setdefault(slot, []).append(c)
    placed = None if resolved is None else resolved.setdefault(_PLACED, {})
    _one_slot_per_weight(plan.targets, contributions, placed)
    plan.contributions = {k: tuple(v) for k, v in contributions.items()}
    if resolved is not None:
        keep = {id(e.lora) for e in stack} | {_PLACED}
        for k in [k for k in resolved if k not in keep]:
            del resolved[k]
    return plan


_PLACED = "placed"  # key of build_plan's ``resolved`` dict holding the placed adapters of the last plan


def _one_slot_per_weight(targets: dict, contributions: dict, placed: dict | None = None) -> None:
    """All slots of one weight become one slot: a split LoRA's ``to_q``/``to_k``/``to_v``/``proj_mlp`` on a
    fused ``qkv``/``linear1`` (disjoint row slices), or a fused LoRA on the whole weight plus a ``to_q``
    LoRA on its first rows (overlapping). The slot spans the rows they cover (the whole weight when one
    takes it whole), each contribution placed at its rows (``place_rows``), so the weight is backed up
    once and written once: one fp32 sum and one rounding per element. ``placed``: a dict kept between
    calls ({(adapter id, rows, height): (adapter, placed adapter)}, pruned to this plan's), so a change of
    strengths places nothing again."""
    used = set()

    def place(adapter, rows: tuple[int, int], height: int):
        if placed is None:
            return place_rows(adapter, rows, height)
        key = (id(adapter), rows, height)
        hit = placed.get(key)
        if hit is None or hit[0] is not adapter:
            hit = placed[key] = (adapter, place_rows(adapter, rows, height))
        used.add(key)
        return hit[1]

    by_key: dict[str, list[str]] = {}
    for slot, t in targets.items():
        by_key.setdefault(t.weight_key, []).append(slot)
    for slots in by_key.values():
        if len(slots) < 2:
            continue
        whole = next((targets[s] for s in slots if targets[s].rows is None), None)
        if whole is not None:
            start, stop, merged = 0, whole.shape[0], whole
        else:
            start, stop = min(targets[s].rows[0] for s in slots), max(targets[s].rows[1] for s in slots)
            t0 = targets[slots[0]]
            merged = replace(t0, rows=(start, stop), shape=(stop - start, *t0.shape[1:]), delta_rows=None)
        moved = []
        for s in slots:
            rows = targets[s].rows or (start, stop)
            for c in contributions.pop(s):
                a = c.adapter if rows == (start, stop) else place(c.adapter, (rows[0] - start, rows[1] - start), stop - start)
                moved.append(replace(c, adapter=a))
            del targets[s]
        slot = slot_of(merged)
        targets[slot] = merged
        contributions[slot] = moved
    if placed is not None:
        for key in [k for k in placed if k not in used]:
            del placed[key]


def changed_slots(old: PatchPlan, new: PatchPlan) -> set[str]:
    """Slots whose effective delta differs between two plans (added, removed or re-weighted)."""
    slots = set(old.contributions) | set(new.contributions)
    return {s for s in slots if old.signature(s) != new.signature(s)}


def keeping(old: PatchPlan, new: PatchPlan, kept) -> PatchPlan:
    """What is on the model after applying ``new`` with the slots in ``kept`` left as ``old`` had them
    (a patcher's own record, so the next change is diffed against the truth)."""
    kept = set(kept)
    if not kept:
        return new
    contributions = {s: c for s, c in new.contributions.items() if s not in kept}
    targets = dict(new.targets)
    for s in kept:
        if s in old.contributions:
            contributions[s] = old.contributions[s]
            targets[s] = old.targets[s]
    return PatchPlan(targets, contributions, new.reports)


def refuse(plan: PatchPlan, slot: str, why: str, culprits=None) -> None:
    """Record in the reports of the LoRAs ``culprits`` (default: every contribution on ``slot``) that
    the slot was left as it was, and why."""
    for c in plan.contributions.get(slot, ()) if culprits is None else culprits:
        report = plan.reports.get(c.lora_id)
        if report is not None:
            report.refused.append(f"{c.module_name}: {why}")


def failure_line(plan: PatchPlan, slot: str, contributions, error: Exception, what: str) -> str:
    """One line for a slot that could not be patched: ``<LoRA file>: module <name>: <what> (<cause>)``."""
    who = ", ".join(f"{_file_of(plan, c)}: module {c.module_name}" for c in contributions) or slot
    cause = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{who}: {what} ({cause}); the model was left as it was"


def _file_of(plan: PatchPlan, c: Contribution) -> str:
    report = plan.reports.get(c.lora_id)
    return report.path if report is not None and report.path else c.lora_id
