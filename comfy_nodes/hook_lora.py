"""Scheduled LoRA as ComfyUI HOOKS: plug into ComfyUI's "Set CLIP Hooks" / "Cond Set Props" nodes."""
from __future__ import annotations

from . import common
from .apply import keymap_for
from .loading import file_signature, stack_entry
from .patches import build_patches
from .schedule import hook_group, keyframes


class LoraEngineHookLora:
    DESCRIPTION = ("A LoRA active between two fractions of the sampling run, as ComfyUI hooks. MODEL/CLIP only "
                   "tell which weights exist; they are not changed. Attach the hooks to conditioning "
                   "(Set CLIP Hooks with apply_to_conds, or Cond Set Props).")
    CATEGORY = common.CATEGORY
    RETURN_TYPES = ("HOOKS",)
    FUNCTION = "create"

    @classmethod
    def INPUT_TYPES(cls):
        pct = {"min": 0.0, "max": 1.0, "step": 0.001}
        return {"required": {"model": ("MODEL",), "lora_name": common.lora_combo(),
                             "strength_model": common.strength(), "strength_clip": common.strength(),
                             "start_percent": ("FLOAT", {"default": 0.0, **pct}),
                             "end_percent": ("FLOAT", {"default": 1.0, **pct})},
                "optional": {"clip": ("CLIP",), "prev_hooks": ("HOOKS",)}}

    @classmethod
    def IS_CHANGED(cls, lora_name, **_):
        return file_signature(lora_name)

    def create(self, model, lora_name, strength_model, strength_clip, start_percent, end_percent,
               clip=None, prev_hooks=None):
        entry = stack_entry(lora_name, strength_clip if clip is not None else 0.0, strength_model)
        patches = build_patches([entry], keymap_for(model, clip), have_clip=clip is not None)
        for line in patches.warnings():
            common.log.warning("lora-engine: %s", line)
        return (hook_group(patches.model, patches.clip, keyframes(start_percent, end_percent), prev_hooks),)
