"""From a stack of LoRAs to patched clones of ComfyUI's MODEL and CLIP.

The ComfyUI objects used (names and signatures as in ComfyUI's ``comfy/model_patcher.py`` and
``comfy/sd.py``):

- ``ModelPatcher.model_state_dict(filter_prefix=None) -> dict`` (keys ``diffusion_model.*``),
  ``ModelPatcher.clone()``, ``ModelPatcher.add_patches(patches, strength_patch=1.0,
  strength_model=1.0) -> list`` of the keys it kept;
- ``CLIP.patcher`` (a ``ModelPatcher`` over ``cond_stage_model``: keys ``clip_l.transformer.*``,
  ``clip_g.transformer.*``, ``clip_h.transformer.*``), ``CLIP.clone()``, ``CLIP.add_patches(...)``.

The incoming objects are never modified: patches go on clones (whose patch lists are copies), so two
graph branches can carry different LoRAs. Chained lora-engine nodes are joined into one stack per
weight (:func:`.patches.fold_into_previous`). Key maps are built once per (model, clip) pair of
modules and reused.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

from lora_engine.keymap import build_keymap

from . import onthefly
from .patches import PatchSet, build_patches, fold_into_previous

log = logging.getLogger("lora_engine")

_KEYMAPS: OrderedDict[tuple[int, int], tuple] = OrderedDict()
_KEYMAPS_MAX = 8
_lock = threading.Lock()


def _shapes(patcher) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in patcher.model_state_dict().items()}


def _module_of(patcher):
    return getattr(patcher, "model", patcher)


def keymap_for(model, clip):
    """The key map over the MODEL patcher's and the CLIP patcher's keys (either may be None)."""
    parts = [p for p in (model, None if clip is None else clip.patcher) if p is not None]
    modules = [_module_of(p) for p in parts]
    ident = tuple(id(m) for m in modules) + (0,) * (2 - len(modules))
    with _lock:
        hit = _KEYMAPS.get(ident)
        if hit is not None and all(r() is m for r, m in zip(hit[0], modules)):
            _KEYMAPS.move_to_end(ident)
            return hit[1]
    shapes: dict[str, tuple[int, ...]] = {}
    for p in parts:
        shapes.update(_shapes(p))
    keymap = build_keymap(shapes)
    with _lock:
        _KEYMAPS[ident] = ([weakref.ref(m) for m in modules], keymap)
        while len(_KEYMAPS) > _KEYMAPS_MAX:
            _KEYMAPS.popitem(last=False)
    return keymap


@dataclass
class Applied:
    model: object
    clip: object
    patches: PatchSet
    warnings: list[str] = field(default_factory=list)


def _add(target, patcher, patches: dict, what: str) -> None:
    """Add to a clone (``target``: a ModelPatcher or CLIP; ``patcher``: its ModelPatcher). ``add_patches``
    is always called: it also renews the clone's ``patches_uuid``, so ComfyUI re-patches it."""
    rest = fold_into_previous(patcher, patches)
    kept = set(target.add_patches(rest, 1.0))
    missing = [k for k in rest if k not in kept]
    if missing:  # the key map was built from this patcher's keys: this means a host inconsistency
        log.warning("lora-engine: %d %s patch(es) refused by ComfyUI (e.g. %s)", len(missing), what, missing[0])


def patch_models(model, clip, patches: PatchSet) -> tuple[object, object]:
    """Clones of ``model``/``clip`` carrying ``patches`` (the inputs themselves when nothing applies)."""
    new_model, new_clip = model, clip
    if model is not None and patches.model:
        new_model = model.clone()
        _add(new_model, new_model, patches.model, "model")
    if clip is not None and patches.clip:
        new_clip = clip.clone()
        _add(new_clip, new_clip.patcher, patches.clip, "clip")
    return new_model, new_clip


def apply_stack(model, clip, stack, mode: str = onthefly.MERGED) -> Applied:
    """Plan ``stack`` (``lora_engine.patch.StackEntry`` list) for these models and patch clones: weight
    patches (``mode`` "merged"), or side paths injected at each run (``"on the fly"``, :mod:`.onthefly`).

    Logs one warning line per LoRA with unmatched or unusable modules (the core's diagnosis)."""
    keymap = keymap_for(model, clip)
    if mode == onthefly.ONTHEFLY and not onthefly.supported(model if model is not None else clip.patcher):
        log.warning("lora-engine: this ComfyUI has no model injections (ModelPatcher.set_injections); "
                    "the LoRAs are merged into the weights instead of running on the fly")
        mode = onthefly.MERGED
    if mode == onthefly.ONTHEFLY:
        new_model, new_clip, patches = onthefly.inject_stack(model, clip, stack, keymap)
    else:
        patches = build_patches(stack, keymap, have_model=model is not None, have_clip=clip is not None)
        new_model, new_clip = patch_models(model, clip, patches)
    lines = patches.warnings()
    for line in lines:
        log.warning("lora-engine: %s", line)
    return Applied(new_model, new_clip, patches, lines)
