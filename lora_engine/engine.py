"""The engine a host holds per model: the current stack, the mode, and the patcher.

    engine = LoraEngine.for_model(root, mode=Mode.MERGED)
    engine.set_stack([StackEntry(cache.get(path), te=0.8, unet=1.0)])   # or Loras(folders).entries(tags)
    ...
    engine.restore()

``set_stack`` moves from the current stack to the wanted one touching only modules whose
effective delta changed. Changing mode restores first.
"""
from __future__ import annotations

import enum

import torch

from .patch import MergedPatcher, OnTheFlyPatcher, PatchPlan, StackEntry, build_plan
from .patch.plan import MAX_STRENGTH
from .quant import is_quantized, logical_shape


class Mode(str, enum.Enum):
    MERGED = "merged"  # deltas added into the weights; fastest per step; restore by copy
    ONTHEFLY = "onthefly"  # hooks on touched modules; weights untouched; runtime factors per LoRA / per sample


AUTOMATIC = "automatic"


def has_quantized_weights(root: torch.nn.Module) -> bool:
    """Whether any parameter is stored quantized (fp8, GGUF blocks, bitsandbytes 4-bit)."""
    return any(is_quantized(p) for p in root.parameters())


def automatic_mode(root: torch.nn.Module) -> Mode:
    """"automatic": on the fly over a quantized model (its layers run their own kernels, nothing is
    re-quantized, nothing to restore), merged otherwise."""
    return Mode.ONTHEFLY if has_quantized_weights(root) else Mode.MERGED


def shapes_of(root: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{parameter key: shape} of a module tree, the input of ``keymap.build_keymap``. A tensor reachable
    under two names is listed once, under the first (A1111's SDXL model holds its ``conditioner`` again
    as ``cond_stage_model``: one pair of text encoders, not two)."""
    seen, out = set(), {}
    for k, v in root.state_dict(keep_vars=True).items():
        if id(v) not in seen:
            seen.add(id(v))
            out[k] = logical_shape(v)
    for k, p in root.named_parameters():  # a host may write packed tensors into its state dict
        if k in out and is_quantized(p):
            out[k] = logical_shape(p)
    return out


class LoraEngine:
    def __init__(self, root: torch.nn.Module, keymap, mode: Mode | str = Mode.MERGED, backup_device: str = "cpu",
                 device_factors: bool = True, force_foreign: bool = False, max_strength: float = MAX_STRENGTH):
        """``mode``: merged, on the fly, or "automatic" (``automatic_mode``). ``backup_device``: "cpu" or "same" (the weight's device) for merged mode's originals.
        ``device_factors``: keep the stack's LoRA tensors on a GPU model's device while they are in the
        stack (about each LoRA's file size of GPU memory) instead of copying them over at every change.
        ``force_foreign``: apply the fitting part of LoRAs made for another model family (default: none
        of them, with the diagnosis in ``warnings()``). ``max_strength``: |strength| warned about."""
        self.root = root
        self.keymap = keymap
        self.mode = automatic_mode(root) if mode == AUTOMATIC else Mode(mode)
        self.backup_device = backup_device
        self.device_factors = device_factors
        self.force_foreign = force_foreign
        self.max_strength = max_strength
        self.stack: list[StackEntry] = []
        self.plan = PatchPlan()
        self._resolved: dict = {}  # build_plan's per-file lookups, for the files in the stack
        self._patcher = self._make_patcher()

    @classmethod
    def for_model(cls, root: torch.nn.Module, **options) -> "LoraEngine":
        """The engine of a model: its key map is derived from the model's own parameter names and shapes
        (diffusers, A1111 ldm/sgm or ComfyUI trees). ``options``: ``mode``, ``backup_device``,
        ``device_factors``."""
        from .keymap import build_keymap

        return cls(root, build_keymap(shapes_of(root)), **options)

    def _make_patcher(self):
        if self.mode is Mode.MERGED:
            return MergedPatcher(self.root, self.backup_device, device_factors=self.device_factors)
        return OnTheFlyPatcher(self.root, device_factors=self.device_factors)

    def set_mode(self, mode: Mode | str) -> None:
        mode = automatic_mode(self.root) if mode == AUTOMATIC else Mode(mode)
        if mode is self.mode:
            return
        stack = self.stack
        self.restore()
        self.mode = mode
        self._patcher = self._make_patcher()
        self.set_stack(stack)

    def set_stack(self, stack: list[StackEntry]):
        """Apply the wanted stack; returns the plan (with per-LoRA reports). All or nothing: on a
        ``PatchError`` the model and the engine are as they were before the call."""
        plan = build_plan(stack, self.keymap, self._resolved, self.force_foreign, self.max_strength)
        self._patcher.apply(plan)
        self.stack, self.plan = list(stack), plan
        return plan

    def set_factor(self, lora_id: str, value) -> None:
        """On-the-fly only: runtime multiplier (scalar or per-sample vector) of one LoRA in the stack."""
        if self.mode is not Mode.ONTHEFLY:
            raise ValueError("runtime factors need on-the-fly mode")
        self._patcher.set_factor(lora_id, value)

    @property
    def stats(self):
        return getattr(self._patcher, "stats", None)

    def warnings(self) -> list[str]:
        return [line for r in self.plan.reports.values() if (line := r.line())]

    def restore(self) -> None:
        self._patcher.restore()
        self.stack, self.plan = [], PatchPlan()
