"""On-the-fly mode: the LoRAs run as side paths on ComfyUI's layers; no weight is written, strengths are
runtime factors.

The ComfyUI mechanism is the one its own bypass LoRA loader uses (``comfy/weight_adapter/bypass.py``,
``comfy/patcher_extension.py``): ``ModelPatcher.set_injections(key, [PatcherInjection(inject, eject)])``.
ComfyUI calls ``inject(patcher)`` whenever it loads the model for a run (``patch_model``, also from
``partially_load``, after merging any weight patches) and ``eject(patcher)`` when it unloads or detaches it.
An injection is not a weight patch: the clone keeps the ``patches_uuid`` of its input, so when only a
strength changed ComfyUI finds the weights already patched as wanted and re-patches nothing.

Our injection puts lora-engine's on-the-fly patcher (:mod:`lora_engine.patch.onthefly`: torch forward hooks
on the touched layers only, ``y = base(x) + Û·(ρ ⊙ D·x)`` per layer for low-rank terms, the dense ΔW of
other types computed once) on the patcher's module tree. There is one such runner per module tree (the
``BaseModel`` or ``cond_stage_model`` every clone shares), kept between runs and taken off (``suspend``)
at eject. Its plan is the node's stack at unit strengths (block weights included); the node strengths are
its runtime factors. A strength change therefore builds the same plan (nothing re-hooked, the side paths'
concatenated factors kept) and only sets factors; another stack re-hooks only the layers whose terms
changed. The last injected stack owns the runner (ComfyUI loads one clone of a model at a time).

Limits: a LoRA type whose ΔW depends on the weight (DoRA, OFT) computes it from the weight as ComfyUI holds
it when first injected (with weight patches merged; under lowvram partial loading, the stored weight);
scheduled (``start=``/``stop=``) parts stay ComfyUI hooks (weight patches).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

from lora_engine.patch import OnTheFlyPatcher, PatchPlan, build_plan

from .patches import NodeKeyMap, PatchSet, only_present

KEY = "lora_engine_onthefly"  # our key in ModelPatcher.injections
ONTHEFLY = "on the fly"
MERGED = "merged"
MODES = (MERGED, ONTHEFLY)

_RUNNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module tree -> (runner, owner)


def supported(patcher) -> bool:
    """Whether this ComfyUI has injections (ComfyUI since late 2024)."""
    return callable(getattr(patcher, "set_injections", None))


def runner_for(root):
    """The on-the-fly patcher kept for a module tree (created suspended)."""
    hit = _RUNNERS.get(root)
    if hit is None:
        runner = OnTheFlyPatcher(root)
        runner.suspended = True
        hit = _RUNNERS[root] = [runner, None]
    return hit[0]


@dataclass
class Layer:
    """One LoRA of an injected stack: its unit-strength entry (unique ``key``) and its node strength."""

    entry: object
    strength: float


class StackInjection:
    """The side paths of one stack on one patcher's module tree (``part``: "unet" or "te")."""

    def __init__(self, layers: tuple[Layer, ...], plan: PatchPlan, part: str):
        self.layers, self.plan, self.part = layers, plan, part

    def inject(self, patcher) -> None:
        runner = runner_for(patcher.model)
        _RUNNERS[patcher.model][1] = self
        runner.apply(self.plan)
        for layer in self.layers:
            if runner.factor(layer.entry.ident) != layer.strength:
                runner.set_factor(layer.entry.ident, layer.strength)
        runner.resume()

    def eject(self, patcher) -> None:
        hit = _RUNNERS.get(patcher.model)
        if hit is not None and hit[1] is self:  # another clone's stack may own the runner: leave it
            hit[0].suspend()
            hit[1] = None


@dataclass
class _Injection:
    """The shape of ComfyUI's ``PatcherInjection`` where ComfyUI is not importable (other hosts, tests)."""

    inject: object
    eject: object


def _injection_class():
    try:
        from comfy.patcher_extension import PatcherInjection
    except ImportError:
        return _Injection
    return PatcherInjection


def _previous(patcher) -> tuple[Layer, ...]:
    for inj in patcher.injections.get(KEY, ()):
        owner = getattr(inj.inject, "__self__", None)
        if isinstance(owner, StackInjection):
            return owner.layers
    return ()


def _unique(entry, taken: set) -> object:
    ident, n = entry.ident, 1
    while ident in taken:
        n += 1
        ident = f"{entry.ident}#{n}"
    taken.add(ident)
    return replace(entry, key=ident)


def _layers(previous: tuple[Layer, ...], stack, part: str) -> tuple[Layer, ...]:
    """The previous node's layers plus this stack's, at unit strength, zero-strength ones dropped."""
    taken = {layer.entry.ident for layer in previous}
    out = list(previous)
    for e in stack:
        s = e.unet if part == "unet" else e.te
        if s != 0.0:
            unit = replace(e, unet=1.0 if part == "unet" else 0.0, te=1.0 if part == "te" else 0.0)
            out.append(Layer(_unique(unit, taken), float(s)))
    return tuple(out)


def inject_stack(model, clip, stack, keymap) -> tuple[object, object, PatchSet]:
    """Clones of ``model``/``clip`` whose runs add ``stack`` as side paths (joined with a lora-engine
    on-the-fly stack already on the inputs). Returns them and the reports of this node's stack."""
    cls = _injection_class()
    keymap = NodeKeyMap(keymap, model is not None, clip is not None)
    resolved: dict = {}  # each file's key lookups, shared by the three plans
    out = PatchSet(reports=build_plan(list(stack), keymap, resolved).reports)
    for report in out.reports.values():
        only_present(report, keymap)
    new_model, new_clip = model, clip
    for part, target in (("unet", model), ("te", clip)):
        if target is None:
            continue
        patcher = target if part == "unet" else target.patcher
        previous = _previous(patcher)
        layers = _layers(previous, stack, part)
        plan = build_plan([layer.entry for layer in layers], keymap, dict(resolved))
        if len(layers) == len(previous) or not plan.contributions:
            continue
        clone = target.clone()
        clone_patcher = clone if part == "unet" else clone.patcher
        injection = StackInjection(layers, plan, part)
        clone_patcher.set_injections(KEY, [cls(inject=injection.inject, eject=injection.eject)])
        if part == "unet":
            new_model = clone
        else:
            new_clip = clone
    return new_model, new_clip, out
