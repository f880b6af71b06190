"""diffusers/transformers configs of a single-file ldm/sgm checkpoint, inferred from its tensor shapes.

Everything structural is in the weights: level widths and count, resnets per level, which levels
have cross-attention and how deep their transformers are, the context width, linear vs 1x1-conv
``proj_in``, SDXL's added ``text_time`` embedding; VAE widths and latent channels; text-encoder
widths, depths, vocabularies and projections. Two things are not: the attention head count (taken
from an A1111-style sidecar ``<stem>.yaml`` when there is one, else the family's convention: SD1
8 heads per level, SD2/SDXL 64-wide heads; text encoders 64-wide heads) and GroupNorm's group
count (ldm always uses 32).

Families (the keys A1111/ComfyUI look at): SD1 ``cond_stage_model.transformer.*`` (CLIP-L),
SD2 ``cond_stage_model.model.*`` (OpenCLIP-H, fused ``attn.in_proj_weight``), SDXL
``conditioner.embedders.0.transformer.*`` (CLIP-L) + ``conditioner.embedders.1.model.*`` (OpenCLIP-G).
"""
from __future__ import annotations

import os
import re

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TE_PREFIXES = {
    "sd1": ("cond_stage_model.transformer.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
}
SAMPLE_SIZE = {"sd1": 64, "sd2": 64, "sdxl": 128}  # latent pixels (SD2 768-v: 96)
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
HEAD_WIDTH = 64
SD1_HEADS = 8


def detect_family(shapes: dict) -> str | None:
    """``"sd1"``, ``"sd2"``, ``"sdxl"`` from the text encoders' prefixes (the UNet must agree), else None."""
    has = lambda prefix: any(k.startswith(prefix) for k in shapes)  # noqa: E731
    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        return "sdxl"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    return None


def _count(shapes: dict, pattern: str) -> int:
    """How many distinct integers ``(\\d+)`` fill the one group of ``pattern`` (a regex over keys)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


# ---- sidecar yaml -------------------------------------------------------------------------------

def read_sidecar(checkpoint: str) -> tuple[dict, str | None]:
    """(the ldm/sgm original config of ``<stem>.yaml`` beside the checkpoint, or {}; its path)."""
    from ..errors import TrainingError

    path = os.path.splitext(checkpoint)[0] + ".yaml"
    if not os.path.isfile(path):
        return {}, None
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TrainingError(f"{path}: cannot read the checkpoint's config yaml ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise TrainingError(f"{path}: not an ldm config (expected a mapping with model.params)")
    return data, path


def _model_params(original: dict) -> dict:
    params = (original.get("model") or {}).get("params") or {}
    return params if isinstance(params, dict) else {}


def sidecar_unet_params(original: dict) -> dict:
    """``unet_config.params`` (ldm) or ``network_config.params`` (sgm), or {}."""
    params = _model_params(original)
    for name in ("unet_config", "network_config"):
        sub = params.get(name) or {}
        if isinstance(sub, dict) and isinstance(sub.get("params"), dict):
            return sub["params"]
    return {}


def sidecar_prediction_type(original: dict) -> str | None:
    p = _model_params(original).get("parameterization")
    if p == "v":
        return "v_prediction"
    if p == "eps":
        return "epsilon"
    return None


def sidecar_scale_factor(original: dict) -> float | None:
    s = _model_params(original).get("scale_factor")
    return float(s) if isinstance(s, (int, float)) else None


# ---- UNet ---------------------------------------------------------------------------------------

def _heads(family: str, widths: list[int], unet_params: dict):
    """diffusers ``attention_head_dim`` (a head COUNT per level, for historical reasons)."""
    n_heads = int(unet_params.get("num_heads", -1) or -1)
    head_ch = int(unet_params.get("num_head_channels", -1) or -1)
    if head_ch > 0:
        return [max(1, w // head_ch) for w in widths]
    if n_heads > 0:
        return n_heads
    if family == "sd1":
        return SD1_HEADS
    return [max(1, w // HEAD_WIDTH) for w in widths]


def unet_config(shapes: dict, family: str, unet_params: dict | None = None, prediction_type: str = "epsilon") -> dict:
    """``UNet2DConditionModel`` kwargs from the ``model.diffusion_model.*`` shapes."""
    s = {k[len(UNET):]: v for k, v in shapes.items() if k.startswith(UNET)}
    n_in = _count(s, r"^input_blocks\.(\d+)\.")
    levels: list[list[int]] = [[]]  # input block indices (resnets) per level
    for i in range(1, n_in):
        if f"input_blocks.{i}.0.op.weight" in s:
            levels.append([])
        else:
            levels[-1].append(i)
    lpb = {len(idx) for idx in levels}
    if len(lpb) != 1:
        raise ValueError(f"UNet levels hold different resnet counts ({sorted(lpb)})")
    widths, attn, depth = [], [], []
    for idx in levels:
        widths.append(s[f"input_blocks.{idx[0]}.0.out_layers.3.weight"][0])
        has = f"input_blocks.{idx[0]}.1.proj_in.weight" in s
        attn.append(has)
        depth.append(_count(s, rf"^input_blocks\.{idx[0]}\.1\.transformer_blocks\.(\d+)\.") if has else 1)
    to_k = next(v for k, v in s.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in s.items() if k.endswith("proj_in.weight"))
    params = unet_params or {}
    cfg = dict(
        sample_size=96 if family == "sd2" and prediction_type == "v_prediction" else SAMPLE_SIZE[family],
        in_channels=s["input_blocks.0.0.weight"][1], out_channels=s["out.2.weight"][0],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(widths), layers_per_block=lpb.pop(), norm_num_groups=32,
        cross_attention_dim=to_k[1], use_linear_projection=len(proj_in) == 2,
        transformer_layers_per_block=1 if set(depth) == {1} else tuple(depth),
    )
    heads = _heads(family, widths, params)
    cfg["attention_head_dim"] = tuple(heads) if isinstance(heads, list) else heads
    if "label_emb.0.0.weight" in s:
        cfg["addition_embed_type"] = "text_time"
        cfg["projection_class_embeddings_input_dim"] = s["label_emb.0.0.weight"][1]
    return cfg


def add_time_dim(unet_cfg: dict, pooled_dim: int) -> dict:
    """SDXL: ``addition_time_embed_dim`` = (adm channels − pooled text width) / 6 size numbers."""
    if unet_cfg.get("addition_embed_type") != "text_time":
        return unet_cfg
    rest = unet_cfg["projection_class_embeddings_input_dim"] - pooled_dim
    if rest <= 0 or rest % 6:
        raise ValueError(f"label_emb takes {unet_cfg['projection_class_embeddings_input_dim']} inputs, "
                         f"which is not the pooled text width {pooled_dim} plus 6 time ids")
    return unet_cfg | {"addition_time_embed_dim": rest // 6}


# ---- VAE ----------------------------------------------------------------------------------------

def vae_config(shapes: dict, family: str, scaling_factor: float | None = None) -> dict:
    """``AutoencoderKL`` kwargs from the ``first_stage_model.*`` shapes."""
    s = {k[len(VAE):]: v for k, v in shapes.items() if k.startswith(VAE)}
    n = _count(s, r"^encoder\.down\.(\d+)\.")
    widths = tuple(s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(n))
    return dict(in_channels=s["encoder.conv_in.weight"][1], out_channels=s["decoder.conv_out.weight"][0],
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=widths, layers_per_block=_count(s, r"^encoder\.down\.0\.block\.(\d+)\."),
                latent_channels=s["post_quant_conv.weight"][0], norm_num_groups=32,
                sample_size=SAMPLE_SIZE[family] * 2 ** (n - 1),
                scaling_factor=scaling_factor or VAE_SCALING[family])


# ---- text encoders ------------------------------------------------------------------------------

def clip_config(shapes: dict, prefix: str) -> dict:
    """``CLIPTextConfig`` kwargs of an HF-layout CLIP-L (``<prefix>text_model.*``)."""
    s = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    s = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in s.items()}
    vocab, width = s["text_model.embeddings.token_embedding.weight"]
    return dict(vocab_size=vocab, hidden_size=width, num_attention_heads=max(1, width // HEAD_WIDTH),
                intermediate_size=s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
                num_hidden_layers=_count(s, r"^text_model\.encoder\.layers\.(\d+)\."),
                max_position_embeddings=s["text_model.embeddings.position_embedding.weight"][0],
                hidden_act="quick_gelu", projection_dim=width)


def openclip_config(shapes: dict, prefix: str) -> dict:
    """``CLIPTextConfig`` kwargs of an OpenCLIP text tower (``<prefix>transformer.resblocks.*``).

    SD2 (``cond_stage_model.model.``): diffusers' converter leaves out resblock 23 (SD2 conditions on
    the penultimate layer), so the HF model has at most 23 layers."""
    s = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    vocab, width = s["token_embedding.weight"]
    layers = _count(s, r"^transformer\.resblocks\.(\d+)\.")
    if prefix == "cond_stage_model.model.":
        layers = min(layers, 23)
    proj = s.get("text_projection")
    return dict(vocab_size=vocab, hidden_size=width, num_attention_heads=max(1, width // HEAD_WIDTH),
                intermediate_size=s["transformer.resblocks.0.mlp.c_fc.weight"][0], num_hidden_layers=layers,
                max_position_embeddings=s["positional_embedding"][0], hidden_act="gelu",
                projection_dim=proj[1] if proj is not None else width)
