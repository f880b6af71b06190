"""Key dialects: split a raw tensor key into (canonical module name, tensor role).

Canonical module names are kohya-style: a prefix (``lora_unet_``, ``lora_te_``,
``lora_te1_``, ``lora_te2_``, ``lora_te3_``) plus the module path with dots
replaced by underscores. When the file spelled the path with dots (diffusers,
PEFT, ComfyUI-native), the dotted path is kept too (``ModuleKey.dotted``) because
it maps onto a model without ambiguity.

Other writers' tensor spellings are normalised once, here, by table; the math in
``adapters/`` only ever sees roles (``down``, ``up``, ``hada_w1_a``, ...).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..families.flux import XLABS

# Tensor suffix -> role. Longest suffix wins (see ``split_key``).
SUFFIX_ROLES: dict[str, str] = {
    # kohya / LyCORIS LoRA
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "scale": "scale",
    "dora_scale": "dora_scale",
    "bias": "bias",
    # PEFT / diffusers
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_B.bias": "up_bias",
    "lora_A.default.weight": "down",
    "lora_B.default.weight": "up",
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    # LyCORIS
    "hada_w1_a": "hada_w1_a",
    "hada_w1_b": "hada_w1_b",
    "hada_w2_a": "hada_w2_a",
    "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1",
    "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1",
    "lokr_w1_a": "lokr_w1_a",
    "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2",
    "lokr_w2_a": "lokr_w2_a",
    "lokr_w2_b": "lokr_w2_b",
    "lokr_t2": "lokr_t2",
    "weight": "weight",  # IA3 (with on_input)
    "on_input": "on_input",
    "a1.weight": "a1",
    "a2.weight": "a2",
    "b1.weight": "b1",
    "b2.weight": "b2",
    "diff": "diff",
    "diff_b": "diff_b",
    "set_weight": "set_weight",  # ComfyUI: the layer's weight replaced
    "w_norm": "w_norm",
    "b_norm": "b_norm",
    "oft_blocks": "oft_blocks",
    "oft_diag": "oft_diag",
    "rescale": "rescale",
}
_SUFFIX_PARTS = max(s.count(".") for s in SUFFIX_ROLES) + 1  # the longest suffix has this many dotted parts

# The oldest diffusers attention-processor form: "<attn>.processor.to_q_lora.down.weight".
_PROCESSOR_RE = re.compile(
    r"^(?P<attn>.*?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out|q_proj|k_proj|v_proj|out_proj)_lora\.(?P<ud>down|up)\.weight$"
)
_PROCESSOR_TARGET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_PROCESSOR_TARGET = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj",
                        "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "out_proj": "out_proj"}

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_")
_WAN_FUN = "lora_unet__"
# Other underscore prefixes and the kohya prefix they stand for.
UNDERSCORE_ALIASES = {"oft_unet_": "lora_unet_", "lycoris_": "lora_unet_", "lora_transformer_": "lora_unet_"}
# Dotted component prefixes -> kohya prefix ("text_encoder" is resolved per file: te_ or te1_).
DOTTED_COMPONENTS = {
    "unet.": "lora_unet_",
    "transformer.": "lora_unet_",
    "diffusion_model.": "lora_unet_",
    "model.diffusion_model.": "lora_unet_",
    "text_encoder_2.": "lora_te2_",
    "text_encoder_3.": "lora_te3_",  # SD3's T5
    "text_encoder.": "TE",
}
_STRIP_PREFIXES = ("base_model.model.",)
# Bare CLIP text-encoder paths. transformers 5's CLIPTextModel has no "text_model." level, so PEFT files of it say
# "base_model.model.encoder.layers.0.self_attn.q_proj..." (CLIPTextModelWithProjection keeps "text_model.");
# canonical_module restores "text_model." so the kohya name is the usual one.
_TE_ROOTS = ("text_model.", "text_projection")
_DIT_TOP = ("img_in", "txt_in", "x_embedder", "context_embedder", "proj_out")  # Flux/SD3 top-level layers
# top-level modules: no dot in their path
_BARE_TOP = ("text_projection", "conv_in", "conv_out", "patch_embedding", "scale_shift_table", *_DIT_TOP)
_UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "conv_norm_out",
               "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out.",
               # diffusion transformers (bare PEFT keys, e.g. DiffSynth): diffusers and native trees
               "transformer_blocks.", "single_transformer_blocks.", "double_blocks.", "single_blocks.", "joint_blocks.",
               "final_layer.", "norm_out.", "time_in.", "vector_in.", "guidance_in.", "time_text_embed.", "pos_embed.",
               "t_embedder.", "y_embedder.", "x_embedder.", "distilled_guidance_layer.", *_DIT_TOP,
               # Wan: native and diffusers trees (DiffSynth writes Wan LoRAs bare)
               "blocks.", "head.", "text_embedding.", "time_projection.", "img_emb.", "condition_embedder.",
               "patch_embedding", "scale_shift_table",
               # NextDiT (Z-Image, Lumina 2): native and diffusers trees
               "layers.", "noise_refiner.", "context_refiner.", "all_x_embedder.", "all_final_layer.", "cap_embedder.",
               "time_caption_embed.")


@dataclass(frozen=True)
class ModuleKey:
    """Canonical module identity: kohya-style ``name`` and, when known, the ``dotted`` path."""

    name: str
    dotted: str | None = None


def split_suffix(key: str) -> tuple[str, str] | None:
    """``"a.b.lora_up.weight"`` -> ``("a.b", "up")``; None if no known suffix. The longest suffix wins; a suffix
    matches whole dotted parts after a ".", so trying the last 3, 2, 1 parts (three dict lookups) finds it."""
    parts = key.rsplit(".", _SUFFIX_PARTS)
    for k in range(min(_SUFFIX_PARTS, len(parts) - 1), 0, -1):
        suffix = ".".join(parts[-k:])
        role = SUFFIX_ROLES.get(suffix)
        if role is not None:
            return key[: -len(suffix) - 1], role
    return None


# XLabs (x-flux) Flux LoRAs: "double_blocks.0.processor.qkv_lora1.down.weight" (no alpha: scale 1).
_XLABS_RE = re.compile(r"^(?P<block>(?:diffusion_model\.)?(?:double|single)_blocks\.\d+)\.processor\."
                       r"(?P<name>qkv_lora[12]?|proj_lora[12]?)\.(?P<ud>down|up)\.weight$")


def _xlabs_form(key: str) -> tuple[str, str] | None:
    m = _XLABS_RE.match(key)
    if not m:
        return None
    block = m.group("block").removeprefix("diffusion_model.")
    return f"diffusion_model.{block}.{XLABS[m.group('name')]}", m.group("ud")


def _processor_form(key: str) -> tuple[str, str] | None:
    if not key.endswith(("_lora.down.weight", "_lora.up.weight")):  # what the regex needs; skips it for most keys
        return None
    m = _PROCESSOR_RE.match(key)
    if not m:
        return None
    attn, proj = m.group("attn"), m.group("proj")
    table = _TE_PROCESSOR_TARGET if ("text_model" in attn or attn.startswith("text_encoder")) else _PROCESSOR_TARGET
    if proj not in table:
        return None
    return f"{attn}.{table[proj]}", m.group("ud")


def _te_path(path: str) -> str:
    """transformers 5 CLIPTextModel path ``encoder.layers.…`` -> the kohya/transformers 4 ``text_model.encoder.layers.…``."""
    return "text_model." + path if path.startswith("encoder.layers.") else path


def canonical_module(raw_module: str, te_prefix: str) -> ModuleKey | None:
    """Map a module path as written in a file to its canonical :class:`ModuleKey`.

    ``te_prefix`` is ``lora_te_`` or ``lora_te1_`` (the latter when the file also
    has ``text_encoder_2`` keys, i.e. SDXL).
    """
    m = raw_module
    for p in _STRIP_PREFIXES:
        if m.startswith(p):
            m = m[len(p):]
    if m.startswith(_WAN_FUN):  # Wan "Fun" LoRAs: "lora_unet__blocks_0_…", one "_" too many
        m = "lora_unet_" + m[len(_WAN_FUN):]
    for p in KOHYA_PREFIXES:
        if m.startswith(p) and "." not in m:
            if p.startswith("lora_te") and m.startswith(p + "encoder_layers_"):  # converted from transformers 5 paths
                m = p + "text_model_" + m[len(p):]
            return ModuleKey(m)
    for p, kp in UNDERSCORE_ALIASES.items():
        if m.startswith(p) and "." not in m:
            return ModuleKey(kp + m[len(p):])
    for p, kp in DOTTED_COMPONENTS.items():
        if m.startswith(p):
            path = m[len(p):]
            for sp in _STRIP_PREFIXES:  # "unet.base_model.model." from old PEFT scripts
                if path.startswith(sp):
                    path = path[len(sp):]
            kp = te_prefix if kp == "TE" else kp
            if kp.startswith("lora_te"):
                path = _te_path(path)
            return ModuleKey(kp + path.replace(".", "_"), path)
    if "." in m or m in _BARE_TOP:  # a bare dotted path (PEFT injected into a bare model)
        m = _te_path(m)
        if m.startswith(_TE_ROOTS):
            return ModuleKey(te_prefix + m.replace(".", "_"), m)
        if m.startswith(_UNET_ROOTS):
            return ModuleKey("lora_unet_" + m.replace(".", "_"), m)
    return None


def parse_key(key: str, te_prefix: str) -> tuple[ModuleKey, str] | None:
    """Split a raw key into (module, role), or None when the key is not understood."""
    proc = _xlabs_form(key) or _processor_form(key)
    if proc is not None:
        module, role = proc
    else:
        split = split_suffix(key)
        if split is None:
            return None
        module, role = split
    mk = canonical_module(module, te_prefix)
    if mk is None:
        return None
    return mk, role


def te_prefix_for(keys) -> str:
    """``lora_te1_`` when the file carries a second text encoder, else ``lora_te_``."""
    for k in keys:
        if k.startswith(("text_encoder_2.", "lora_te2_", "base_model.model.text_encoder_2.")):
            return "lora_te1_"
    return "lora_te_"
