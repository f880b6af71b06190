"""Text-encoder entries: HF-layout CLIP and the OpenCLIP towers ldm/sgm hold.

HF layout (``CLIPTextModel``/``...WithProjection``; A1111's SD1/SDXL-L ``transformer``; ComfyUI's
``clip_l``/``clip_h``/``clip_g``): kohya's rule applies directly,
``text_model.encoder.layers.0.self_attn.q_proj`` <-> ``<prefix>text_model_encoder_layers_0_self_attn_q_proj``.
A transformers>=5 ``CLIPTextModel`` has no ``text_model`` level, and LoRAs trained on one (LyCORIS,
PEFT) say ``lora_te_encoder_layers_0_…``; both spellings are accepted on every HF-layout root.

OpenCLIP (SD2's OpenCLIP-H, SDXL's OpenCLIP-G in A1111): each declared layer (``families.openclip``)
is listed under its HF path only; q/k/v are row blocks of the fused ``in_proj_weight``.
"""
from __future__ import annotations

from ..families.openclip import POSITIONAL, openclip_config, openclip_layers
from .roots import Root
from .target import Target, module_target, underscored, unwrapped, weighted_modules


NEST = "text_model."


def hf_spellings(path: str) -> list[str]:
    """The nested path and, for ``text_model.*``, the flat one (``encoder.layers.0…``) that trainers
    write for a transformers>=5 ``CLIPTextModel``."""
    return [path, path[len(NEST):]] if path.startswith(NEST) else [path]


def clip_entries(root: Root, prefix: str):
    """Yield ``(kohya names, dotted paths, Target)`` for each weighted module."""
    nest = NEST if root.naming == "hf_clip_flat" else ""
    for module in weighted_modules(root):
        paths = hf_spellings(nest + unwrapped(module))
        yield [prefix + underscored(p) for p in paths], paths, module_target(root, module, "te")


def _names(prefix: str, path: str) -> list[str]:
    return [prefix + underscored(p) for p in hf_spellings(path)]


def openclip_entries(root: Root, prefix: str):
    """Yield ``(kohya names, dotted HF paths, Target)`` for each declared OpenCLIP weight: whole modules
    in key order, then the q/k/v rows of each fused ``in_proj``, then the positional embedding."""
    layers = openclip_layers(openclip_config(root.shapes))
    hf = {layer.native: layer.parts[0].diffusers for layer in layers if layer.one_to_one}
    fused = {f"{layer.native}.{layer.native_param}": layer for layer in layers if not layer.one_to_one}
    for module in weighted_modules(root):
        path = hf.get(unwrapped(module))
        if path is not None:
            yield _names(prefix, path), hf_spellings(path), module_target(root, module, "te")
    for key, shape in root.shapes.items():
        layer = fused.get(key)
        if layer is None:
            continue
        bias = key[: -len("weight")] + "bias"
        for part in layer.parts:
            a, b = part.native_rows
            target = Target(root.full(key), root.full(bias) if bias in root.shapes else None, (a, b), "te",
                            (b - a, *shape[1:]))
            yield _names(prefix, part.diffusers), hf_spellings(part.diffusers), target
    native, path = POSITIONAL
    if native in root.shapes:
        target = Target(root.full(native), None, None, "te", tuple(root.shapes[native]))
        yield _names(prefix, path), hf_spellings(path), target
