"""LoRA Loader (MODEL + CLIP) and its model-only variant: one LoRA, two strengths, optional block weights."""
from __future__ import annotations

from . import common
from .apply import apply_stack
from .loading import file_signature, stack_entry
from .onthefly import MERGED


class LoraEngineLoader:
    DESCRIPTION = ("Apply one LoRA (kohya, LyCORIS, diffusers/PEFT, ComfyUI-native) with lora-engine's math. "
                   "Returns patched clones; the inputs stay untouched.")
    CATEGORY = common.CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "lora_name": common.lora_combo(),
                             "strength_model": common.strength(), "strength_clip": common.strength()},
                "optional": {"block_weights": common.block_weights(), "mode": common.mode()}}

    @classmethod
    def IS_CHANGED(cls, lora_name, **_):
        return file_signature(lora_name)

    def load(self, model, clip, lora_name, strength_model, strength_clip, block_weights="", mode=MERGED):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        applied = apply_stack(model, clip, [stack_entry(lora_name, strength_clip, strength_model, block_weights)], mode)
        return (applied.model, applied.clip)


class LoraEngineLoaderModelOnly:
    DESCRIPTION = "Apply one LoRA to the MODEL only (its text-encoder modules are skipped without warnings)."
    CATEGORY = common.CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "lora_name": common.lora_combo(),
                             "strength_model": common.strength()},
                "optional": {"block_weights": common.block_weights(), "mode": common.mode()}}

    @classmethod
    def IS_CHANGED(cls, lora_name, **_):
        return file_signature(lora_name)

    def load(self, model, lora_name, strength_model, block_weights="", mode=MERGED):
        if strength_model == 0:
            return (model,)
        applied = apply_stack(model, None, [stack_entry(lora_name, 0.0, strength_model, block_weights)], mode)
        return (applied.model,)
