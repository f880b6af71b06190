"""A lora-engine plan as ComfyUI weight patches: one adapter object per patched weight (or bias).

ComfyUI keeps ``ModelPatcher.patches[key] = [(strength_patch, value, strength_model, offset,
function), ...]`` and, when it loads the model (full load, partial/lowvram load, hooks), calls
``comfy.lora.calculate_weight(patches, W, key)``: for a value that is a ``WeightAdapterBase`` it
calls ``value.calculate_weight(W, key, strength_patch, strength_model, offset, function,
intermediate_dtype, original_weight)`` on the working copy ``W`` (``offset`` already narrowed).
Our value computes, for the slot's contributions ``(m_k, ΔW_k)`` of the node's whole stack:

    W ← cast_W( fp32(W) + function(s · Σ_k m_k · ΔW_k(W)) )          (s = strength_patch)

with ``Σ m_k ΔW_k`` from :func:`lora_engine.patch.delta.summed_delta` (the same function the
engine's merged patcher calls), in fp32, in place. With ``s = 1`` (how the nodes add patches)
and ComfyUI's fp32 working copy on CPU this is bit for bit the engine's merged weight
``cast(W₀ + Σ m_k ΔW_k)``. ComfyUI-only imports happen inside :func:`adapter_class`.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

from lora_engine.finite import nonfinite
from lora_engine.patch import build_plan
from lora_engine.patch.delta import add_base, summed_bias, summed_delta
from lora_engine.patch.plan import LoraReport

log = logging.getLogger("lora_engine")


def has_bias_delta(contributions) -> bool:
    return any(c.adapter.has_bias_delta for c in contributions)


class EngineWeightMath:
    """The weight calculation of one patched slot; ``part`` is ``"weight"`` or ``"bias"``."""

    name = "lora-engine"

    def __init__(self, contributions: tuple, part: str, weight_shape: tuple[int, ...], warned: set | None = None):
        self.contributions = tuple(contributions)
        self.part = part
        self.weight_shape = tuple(weight_shape)
        self.warned = set() if warned is None else warned  # shared by the patches of one node: one line per LoRA
        self.loaded_keys: set[str] = set()
        self.weights: list = []  # ComfyUI's adapters keep their tensors here; ours live in the contributions

    def delta(self, current: torch.Tensor) -> torch.Tensor | None:
        """fp32 ``Σ m_k ΔW_k`` (or ``Σ m_k Δb_k``) for the working tensor ``current``."""
        if self.part == "weight":
            return summed_delta(self.contributions, current)[0]
        return summed_bias(self.contributions, current.device)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None, *args, **kwargs):
        """ComfyUI's ``WeightAdapterBase.calculate_weight`` signature; updates ``weight`` in place.

        ComfyUI calls this while it loads the model for sampling, where an exception would stop the
        run: a failing adapter, or a result that is not finite, leaves ``weight`` as ComfyUI passed
        it, with one warning line per LoRA file and cause."""
        if strength == 0.0:
            return weight
        try:
            new = self._patched(weight, strength, function)
        except Exception as e:  # noqa: BLE001 - any failure of the math must not reach ComfyUI's sampler
            self._warn(key, f"cannot be applied ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            return weight
        if new is None:
            return weight
        if nonfinite(new) and not nonfinite(weight):
            self._warn(key, "gives a weight that is not finite")
            return weight
        weight.copy_(new)
        return weight

    def _warn(self, key, what: str) -> None:
        """``lora-engine: <LoRA>: <what> on <key>; ComfyUI's weight was kept``, once per LoRA per node."""
        loras = ", ".join(sorted({c.lora_id for c in self.contributions}))
        if loras in self.warned:
            return
        self.warned.add(loras)
        log.warning("lora-engine: %s: %s on %s; ComfyUI's weight was kept (other weights of it are not listed)",
                    loras, what, key if isinstance(key, str) else key[0])

    def _patched(self, weight, strength, function) -> torch.Tensor | None:
        """cast(fp32(W) + function(s · Σ m ΔW)), or None when no term changes the weight."""
        d = self.delta(weight)
        if d is None:
            return None
        d = d.reshape(weight.shape)  # a fresh fp32 tensor: scaled and summed in place (the same bits)
        if strength != 1.0:
            d.mul_(float(strength))
        f = function(d) if function is not None else d
        if f is d:  # ComfyUI's default function is an identity lambda: add W in place
            return add_base(d, weight).to(weight.dtype)
        return (weight.to(torch.float32) + f).to(weight.dtype)

    def __repr__(self) -> str:
        names = ", ".join(sorted({c.lora_id.rsplit("/", 1)[-1] for c in self.contributions}))
        return f"<lora-engine {self.part} patch: {names}>"


@functools.lru_cache(maxsize=None)
def _class_for(base: type) -> type:
    if base is object:
        return EngineWeightMath
    return type("LoraEngineWeightAdapter", (EngineWeightMath, base), {})


def adapter_class() -> type:
    """Our adapter type: a subclass of ComfyUI's ``WeightAdapterBase`` when ComfyUI is importable
    (``calculate_weight`` dispatches on it), else the plain class (tests, other hosts)."""
    try:
        from comfy.weight_adapter import WeightAdapterBase
    except ImportError:
        return _class_for(object)
    return _class_for(WeightAdapterBase)


def make_adapter(contributions, part: str, weight_shape, warned: set | None = None) -> EngineWeightMath:
    return adapter_class()(contributions, part, weight_shape, warned)


def patch_key(key: str, rows):
    """ComfyUI's patch key: the state-dict key, or ``(key, (dim, start, length))`` for a row slice."""
    return key if rows is None else (key, (0, rows[0], rows[1] - rows[0]))


def fold_into_previous(patcher, patches: dict) -> dict:
    """Join our patches with lora-engine patches an upstream lora-engine node left on the same weights.

    Where the (cloned) patcher's last entry for a key is one of ours at strength 1 with the same slice,
    it is replaced by one patch over both nodes' contributions, so chained nodes give the joint
    ``Σ m_k ΔW_k(W₀)`` of one stack (order-independent, also for DoRA and OFT) instead of each node
    seeing the weight the previous one left. Anything else in between (a merge node, another pack's
    patch) keeps ComfyUI's chaining. Returns the patches that still have to be added."""
    rest = {}
    for k, value in patches.items():
        key, offset = (k, None) if isinstance(k, str) else (k[0], k[1])
        entries = patcher.patches.get(key)
        last = entries[-1] if entries else None
        if (last is not None and isinstance(last[1], EngineWeightMath) and last[1].part == value.part
                and last[0] == 1.0 and last[2] == 1.0 and last[3] == offset and last[4] is None):
            joint = make_adapter(last[1].contributions + value.contributions, value.part, value.weight_shape,
                                 value.warned)
            entries[-1] = (1.0, joint, 1.0, offset, None)
        else:
            rest[k] = value
    return rest


@dataclass
class PatchSet:
    """Patches for the MODEL patcher and for the CLIP patcher, and one report per LoRA."""

    model: dict = field(default_factory=dict)
    clip: dict = field(default_factory=dict)
    reports: dict[str, LoraReport] = field(default_factory=dict)

    def warnings(self) -> list[str]:
        return [line for r in self.reports.values() if (line := r.line())]


class NodeKeyMap:
    """The key map as a node sees it: names of a part the node was not given (the text-encoder modules on a
    model-only node) are neither 'unmatched' nor evidence that the LoRA was made for another model family
    (a Flux LoRA's ``lora_te2_`` T5 names would otherwise read as SDXL's second encoder)."""

    def __init__(self, keymap, have_model: bool = True, have_clip: bool = True):
        self.keymap, self.have_model, self.have_clip = keymap, have_model, have_clip

    def __getattr__(self, name):
        return getattr(self.keymap, name)

    def present(self, names) -> list[str]:
        return [n for n in names if (self.have_clip or not n.startswith("lora_te"))
                and (self.have_model or not n.startswith("lora_unet_"))]

    def diagnose(self, names) -> str:
        keep = self.present(names)
        return self.keymap.diagnose(keep) if keep else ""

    def foreign_family(self, names):
        keep = self.present(names)
        return self.keymap.foreign_family(keep) if keep else None


def only_present(report: LoraReport, keymap: NodeKeyMap) -> None:
    """Drop the names of a part the node was not given from a LoRA's unmatched list."""
    keep = keymap.present(report.unmatched)
    if len(keep) != len(report.unmatched):
        report.unmatched = keep
        report.diagnosis = keymap.diagnose(keep)


def build_patches(stack, keymap, have_model: bool = True, have_clip: bool = True) -> PatchSet:
    """Plan ``stack`` (``StackEntry`` list) on ``keymap`` and turn each slot into patches."""
    keymap = NodeKeyMap(keymap, have_model, have_clip)
    plan = build_plan(list(stack), keymap)
    out = PatchSet(reports=plan.reports)
    warned: set = set()
    for report in plan.reports.values():
        only_present(report, keymap)
    for slot, contributions in plan.contributions.items():
        target = plan.targets[slot]
        dest = out.model if target.component == "unet" else out.clip
        dest[patch_key(target.weight_key, target.rows)] = make_adapter(contributions, "weight", target.shape, warned)
        if target.bias_key is not None and has_bias_delta(contributions):
            dest[patch_key(target.bias_key, target.rows)] = make_adapter(contributions, "bias", target.shape, warned)
    return out
