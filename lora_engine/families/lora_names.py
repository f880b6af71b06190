"""Which diffusion-transformer family a LoRA file was made for, from its module names alone (no model):
names only one family's trees have (Flux's ``double_blocks``/``single_transformer_blocks``, SD3's
``joint_blocks``/``attn2``), a second text encoder that is a T5 (Flux) or CLIP-G (SD3), else the
``modelspec.architecture``/``ss_base_model_version`` metadata. A file with diffusers ``transformer_blocks.N``
names only fits both; :class:`AmbiguousFamily` says so."""
from __future__ import annotations

import re

from ..errors import LoraEngineError
from . import BY_NAME, Family

UNET = "lora_unet_"
_FLUX_ONLY = re.compile(r"^(double_blocks_|single_blocks_|single_transformer_blocks_|x_embedder$|img_in$"
                        r"|txt_in$|time_text_embed_guidance_|distilled_guidance_layer_)")
_SD3_ONLY = re.compile(r"^(joint_blocks_|pos_embed_|x_embedder_proj$|t_embedder_|y_embedder_"
                       r"|transformer_blocks_\d+_attn2_)")
_SD_UNET = re.compile(r"^(down_blocks_|up_blocks_|mid_block_|input_blocks_|middle_block_|output_blocks_|conv_in|time_emb)")


class AmbiguousFamily(LoraEngineError, ValueError):
    """The names fit Flux.1 and SD3 alike."""


def family_from_names(names: list[str], metadata: dict) -> Family | None:
    """Flux/Chroma/SD3 from a LoRA's module names (and ``modelspec.architecture`` when names do not tell)."""
    rest = [n[len(UNET):] for n in names if n.startswith(UNET)]
    # a second text encoder that is a T5 is Flux's (diffusers text_encoder_2, OneTrainer lora_te2_), SD3's is CLIP-G
    flux = any(_FLUX_ONLY.match(r) for r in rest) or any(n.startswith("lora_te2_encoder_block_") for n in names)
    sd3 = any(_SD3_ONLY.match(r) for r in rest) or any(n.startswith("lora_te2_text_model_") for n in names)
    if flux and not sd3:
        return BY_NAME["chroma"] if any("distilled_guidance_layer" in r for r in rest) else BY_NAME["flux"]
    if sd3 and not flux:
        return BY_NAME["sd3"]
    arch = (metadata.get("modelspec.architecture") or metadata.get("ss_base_model_version") or "").lower()
    if "flux" in arch:
        return BY_NAME["flux"]
    if "sd3" in arch or "stable-diffusion-v3" in arch:
        return BY_NAME["sd3"]
    if any(r.startswith("transformer_blocks_") for r in rest) and not any(_SD_UNET.match(r) for r in rest):
        raise AmbiguousFamily("this LoRA's names fit both Flux.1 and SD3 (only transformer_blocks.N layers)")
    return None
