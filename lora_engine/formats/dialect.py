"""The dialect of a LoRA file: which writer's key spelling it uses, from its raw keys (reference
dit_families.md §2). Finer than :attr:`LoraFile.format` (which says how the keys were parsed):

========================  ======================================================================
dialect                   keys (examples)
========================  ======================================================================
kohya                     ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``.alpha``
LyCORIS                   ``lora_unet_…hada_w1_a`` / ``lokr_w1`` (kohya names), ``lycoris_…`` (SimpleTuner)
OneTrainer                ``lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight``
diffusers/PEFT            ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, ``unet.…``
diffusers (old)           ``…processor.to_q_lora.down.weight``
PEFT                      an adapter folder, or ``base_model.model.<path>.lora_A.weight``
fal                       ``base_model.model.`` + Flux names (fal's Kontext trainer)
ComfyUI-native            ``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`` / ``.lora_A``
BFL                       ``double_blocks.0.img_attn.qkv.lora_A.weight`` (no prefix); control LoRAs add
                          ``.lora_B.bias`` and norm ``.scale`` tensors
XLabs                     ``double_blocks.0.processor.qkv_lora1.down.weight``
DiffSynth                 ``transformer_blocks.0.attn.to_q.lora_A.weight`` (diffusers names, no prefix)
========================  ======================================================================

``+DoRA`` is added when the file holds DoRA magnitudes (``dora_scale``, ``lora_magnitude_vector``).
"""
from __future__ import annotations

import os
from collections.abc import Iterable

_NATIVE_DIT = ("double_blocks.", "single_blocks.", "joint_blocks.", "img_in.", "txt_in.", "final_layer.",
               "time_in.", "vector_in.", "guidance_in.")
_DIFFUSERS_DIT = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                  "norm_out.", "proj_out.", "time_text_embed.")
_LYCORIS = ("hada_w1_a", "lokr_w1", "lokr_w1_a", "oft_blocks", "oft_diag", ".a1.", ".on_input", ".w_norm")


def dialect(keys: Iterable[str], fmt: str) -> str:
    """The writer's dialect of a file with these raw keys, parsed as ``fmt`` (``LoraFile.format``)."""
    keys = list(keys)
    name = _dialect(keys, fmt)
    if any(k.endswith(("dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight")) for k in keys):
        name += "+DoRA"
    return name


def _dialect(keys: list[str], fmt: str) -> str:
    def any_start(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if any_start("lycoris_"):
        return "LyCORIS"
    if any_start("lora_transformer_"):
        return "OneTrainer"
    if any_start("lora_unet_", "lora_te"):
        return "LyCORIS" if fmt == "lycoris" or any(x in k for k in keys for x in _LYCORIS) else "kohya"
    if fmt == "xlabs":
        return "XLabs"
    if fmt == "diffusers-old":
        return "diffusers (old)"
    if any_start("diffusion_model.", "model.diffusion_model."):
        return "ComfyUI-native"
    if any_start("base_model.model."):
        rest = [k[len("base_model.model."):] for k in keys if k.startswith("base_model.model.")]
        return "fal" if any(r.startswith(_NATIVE_DIT + _DIFFUSERS_DIT) for r in rest) else "PEFT"
    if fmt == "peft":
        return "PEFT"
    if any_start("transformer.", "unet.", "text_encoder.", "text_encoder_2.", "text_encoder_3."):
        return "diffusers/PEFT"
    if any_start(*_NATIVE_DIT):
        return "BFL"
    if any_start(*_DIFFUSERS_DIT):
        return "DiffSynth"
    return fmt


def file_keys(path: str) -> list[str]:
    """The raw tensor keys of a LoRA file or PEFT folder (safetensors: the header only)."""
    from . import PICKLE_EXTS
    from .legacy import read_pickled
    from .peft_folder import folder_weights, is_peft_folder
    from .safetensors_file import SafetensorsFile

    if os.path.isdir(path):
        return file_keys(folder_weights(path)) if is_peft_folder(path) else []
    if path.lower().endswith(PICKLE_EXTS):
        return list(read_pickled(path)[0])
    return list(SafetensorsFile(path).info)
