"""Prompt with LoRA tags: an A1111 prompt (``<lora:name:te:unet:dyn=…:lbw=…:start=…:stop=…>``) in one node.

The tags (full grammar of :mod:`lora_engine.syntax.prompt`) are removed from the text, resolved with
lora-engine's library over ComfyUI's ``loras`` folders, applied to clones of MODEL and CLIP,
and the cleaned text is encoded with the patched CLIP (as ComfyUI's CLIPTextEncode:
``clip.tokenize`` then ``clip.encode_from_tokens_scheduled``). Tags with ``start=``/``stop=``
put their UNet part on the returned CONDITIONING as ComfyUI hooks (:mod:`.schedule`); their
text-encoder part applies to the whole prompt. A tag that cannot be used is skipped with one
warning; the others still apply.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from lora_engine.errors import LoraEngineError
from lora_engine.patch import StackEntry
from lora_engine.syntax.prompt import LoraTag, parse_prompt

from . import common, loading
from .apply import apply_stack, keymap_for
from .onthefly import MERGED
from .patches import build_patches
from .schedule import attach, hook_group, keyframes


def entry_for(tag: LoraTag) -> StackEntry:
    """Resolve and load a tag's LoRA (cached). Raises lora-engine errors naming the tag's file."""
    loading.library()
    return loading.LORAS.entry(tag)


@dataclass
class TagPlan:
    static: list[StackEntry] = field(default_factory=list)
    scheduled: list[tuple[StackEntry, list[tuple[float, float]]]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def plan_tags(tags, steps: int, hooks_available: bool) -> TagPlan:
    """Split tags into static entries and (UNet-only entry, keyframes) pairs."""
    out = TagPlan()
    for tag in tags:
        try:
            entry = entry_for(tag)
        except LoraEngineError as e:
            out.warnings.append(f"{tag.raw}: {e}; tag skipped")
            continue
        if tag.window.always:
            out.static.append(entry)
            continue
        try:
            frames = keyframes(*tag.window.fractions(steps))
        except ValueError as e:
            out.warnings.append(f"{tag.raw}: {e}: set the node's 'steps' input; applied to every step")
            out.static.append(entry)
            continue
        if not hooks_available:
            out.warnings.append(f"{tag.raw}: start/stop need ComfyUI's hooks (not importable); applied to every step")
            out.static.append(entry)
            continue
        out.static.append(replace(entry, unet=0.0))
        out.scheduled.append((replace(entry, te=0.0), frames))
    return out


def _hooks_available() -> bool:
    try:
        import comfy.hooks  # noqa: F401
    except ImportError:
        return False
    return True


def encode(clip, text: str):
    """CONDITIONING of ``text``, as ComfyUI's CLIPTextEncode makes it."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


class LoraEnginePromptTags:
    DESCRIPTION = ("Paste an A1111 prompt: its <lora:…> tags are applied to MODEL and CLIP, the cleaned text is "
                   "encoded. Outputs the patched MODEL and CLIP, the CONDITIONING and the cleaned text.")
    CATEGORY = common.CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "CONDITIONING", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "CONDITIONING", "text")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",),
                             "text": ("STRING", {"multiline": True, "dynamicPrompts": False})},
                "optional": {"steps": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip":
                                               "sampling steps, to place whole-number start=/stop= (0: fractions only)"}),
                             "mode": common.mode()}}

    @classmethod
    def IS_CHANGED(cls, text, **_):
        return "|".join(loading.tag_signature(t.name) for t in parse_prompt(text).tags)

    def apply(self, model, clip, text, steps=0, mode=MERGED):
        parsed = parse_prompt(text)
        plan = plan_tags(parsed.tags, int(steps), _hooks_available())
        for w in list(parsed.warnings) + plan.warnings:
            common.log.warning("lora-engine: %s", w)
        applied = apply_stack(model, clip, plan.static, mode)
        cond = encode(applied.clip, parsed.cleaned_text)
        keymap = keymap_for(model, clip) if plan.scheduled else None
        for entry, frames in plan.scheduled:
            patches = build_patches([entry], keymap)
            cond = attach(cond, hook_group(patches.model, {}, frames))
        return (applied.model, applied.clip, cond, parsed.cleaned_text)
