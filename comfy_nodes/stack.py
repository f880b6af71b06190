"""LoRA Stack: several LoRAs with per-row on/off and model/clip strengths, applied as one stack.

All rows become one lora-engine plan, so each patched weight gets one adapter computing
``Σ m_k ΔW_k`` from the same original weight (order-independent, as the engine's merge).
"""
from __future__ import annotations

from . import common
from .apply import apply_stack
from .loading import file_signature, stack_entry
from .onthefly import MERGED

ROWS = 6


class LoraEngineStack:
    DESCRIPTION = "Up to six LoRAs in one node; rows that are off, set to None or at strength 0 are skipped."
    CATEGORY = common.CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        optional = {"clip": ("CLIP",), "mode": common.mode()}
        for i in range(1, ROWS + 1):
            optional[f"on_{i}"] = ("BOOLEAN", {"default": True})
            optional[f"lora_{i}"] = common.lora_combo(optional=True)
            optional[f"strength_model_{i}"] = common.strength()
            optional[f"strength_clip_{i}"] = common.strength()
        return {"required": {"model": ("MODEL",)}, "optional": optional}

    @classmethod
    def IS_CHANGED(cls, **kw):
        return "|".join(file_signature(v) for k, v in sorted(kw.items())
                        if k.startswith("lora_") and v not in (None, common.NONE))

    @staticmethod
    def rows(kw: dict) -> list[tuple[str, float, float]]:
        """(name, strength_model, strength_clip) of the active rows, in row order."""
        out = []
        for i in range(1, ROWS + 1):
            name = kw.get(f"lora_{i}", common.NONE)
            sm, sc = float(kw.get(f"strength_model_{i}", 1.0)), float(kw.get(f"strength_clip_{i}", 1.0))
            if kw.get(f"on_{i}", True) and name not in (None, common.NONE) and (sm != 0 or sc != 0):
                out.append((name, sm, sc))
        return out

    def apply(self, model, clip=None, mode=MERGED, **kw):
        stack = [stack_entry(name, sc if clip is not None else 0.0, sm) for name, sm, sc in self.rows(kw)]
        if not stack:
            return (model, clip)
        applied = apply_stack(model, clip, stack, mode)
        return (applied.model, applied.clip)
