"""A training host from a single-file ldm/sgm safetensors checkpoint (as A1111 and ComfyUI load it).

SD1.x (``model.diffusion_model.*``, ``cond_stage_model.transformer.*`` CLIP-L, ``first_stage_model.*``),
SD2.x (``cond_stage_model.model.*`` OpenCLIP-H) and SDXL (``conditioner.embedders.0.transformer.*``
CLIP-L + ``conditioner.embedders.1.model.*`` OpenCLIP-G). No hub access: the diffusers configs are
inferred from the tensor shapes (:mod:`.ldm_config`, with an A1111-style ``<stem>.yaml`` for the
attention heads and parameterization), the state dicts are converted by diffusers' own
``single_file_utils`` converters, the models are built empty and loaded strictly, and the
tokenizers come from :mod:`.clip_tokenizer`. The noise schedule is SD's DDPM scaled-linear
0.00085–0.012 over 1000 steps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import LoraEngineError, TrainingError
from . import ldm_config as lc
from .host import TrainHost

PREDICTION_TYPES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def is_sd_checkpoint(path: str | os.PathLike) -> bool:
    """True for a readable safetensors file holding an ldm/sgm UNet (``model.diffusion_model.*``)."""
    from ..formats.safetensors_file import SafetensorsFile

    try:
        return any(k.startswith(lc.UNET) for k in SafetensorsFile(path).info)
    except LoraEngineError:
        return False


def _looks_like_lora(keys) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in k or ".lora_A." in k
               or k.endswith(".alpha") for k in keys)


def _check_layout(path: str, shapes: dict) -> str:
    """The family, or one clear error naming what is missing."""
    if not any(k.startswith(lc.UNET) for k in shapes):
        what = "it looks like a LoRA, not a base model" if _looks_like_lora(shapes) else \
            "keys do not follow the ldm/sgm layout A1111 and ComfyUI load"
        raise TrainingError(f"{path}: not a Stable Diffusion checkpoint (no {lc.UNET}* UNet weights; {what})")
    family = lc.detect_family(shapes)
    if family is None and any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        raise TrainingError(f"{path}: an SDXL refiner checkpoint (one OpenCLIP-G encoder); LoRA training needs "
                            "a base model")
    if family is None:
        raise TrainingError(f"{path}: no text encoder weights (cond_stage_model.* or conditioner.embedders.*)")
    if not any(k.startswith(lc.VAE) for k in shapes):
        raise TrainingError(f"{path}: no VAE weights ({lc.VAE}*); training needs the checkpoint with its VAE baked in")
    return family


def _read(ckpt, prefixes: tuple[str, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors under ``prefixes``, floating ones cast to ``dtype`` one at a time (peak: one extra tensor)."""
    out = {}
    for k in ckpt.shapes():
        if k.startswith(prefixes):
            t = ckpt.read(k)
            out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


def _empty(cls, *args, **kwargs):
    """``cls(*args, **kwargs)`` with its parameters on the meta device (no init cost; loaded by assignment)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls(*args, **kwargs)


def _text_model_level(sd: dict, expected) -> dict:
    """Checkpoints (and diffusers' converters) name CLIP weights ``text_model.*``; transformers >= 5's
    ``CLIPTextModel`` has no ``text_model`` level (``CLIPTextModelWithProjection`` still has)."""
    level = "text_model."
    if any(k.startswith(level) for k in expected) or not any(k.startswith(level) for k in sd):
        return sd
    return {k[len(level):] if k.startswith(level) else k: v for k, v in sd.items()}


def _load(model, sd: dict, path: str, what: str, dtype: torch.dtype):
    """``load_state_dict(strict=True)`` after a one-line check that names the file and the first mismatches."""
    expected = model.state_dict()
    sd = _text_model_level(sd, expected)
    # position ids are an arange, never weights: old checkpoints store them broken (float, shifted), so the
    # model's own buffer (kept real by init_empty_weights) always wins
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    sd.update({k: v for k, v in expected.items() if k.endswith("position_ids")})
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
             if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shape:
        parts = [f"{len(v)} {n} (e.g. {v[0]})" for n, v in (("missing", missing), ("unexpected", unexpected),
                                                            ("wrong-shape", shape)) if v]
        raise TrainingError(f"{path}: {what} weights do not fit the layout inferred from the file: {'; '.join(parts)}")
    for k, v in sd.items():  # in place: a cast copy replaces its source at once
        if v.is_floating_point() and v.dtype != dtype:
            sd[k] = v.to(dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def _text_config(cfg: dict, tok, path: str, what: str) -> dict:
    n = len(tok)
    if n > cfg["vocab_size"]:
        raise TrainingError(f"{path}: the tokenizer has {n} tokens but the {what} embeds only {cfg['vocab_size']}")
    return cfg | dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


@dataclass
class SingleFileModel:
    """The loaded parts of a single-file checkpoint (frozen, in eval mode)."""

    family: str  # sd1 | sd2 | sdxl
    unet: torch.nn.Module
    text_encoders: list
    tokenizers: list
    vae: torch.nn.Module
    scheduler: object  # DDPMScheduler
    prediction_type: str
    name: str


def infer_configs(path: str, shapes: dict, family: str, original: dict, prediction_type: str):
    """(UNet, VAE, [text encoder]) config kwargs from the tensor shapes and the sidecar config."""
    part = "text encoder"
    try:
        te_cfgs = [lc.clip_config(shapes, p) if p.endswith(".transformer.") else lc.openclip_config(shapes, p)
                   for p in lc.TE_PREFIXES[family]]
        part = "UNet"
        unet_cfg = lc.unet_config(shapes, family, lc.sidecar_unet_params(original), prediction_type)
        unet_cfg = lc.add_time_dim(unet_cfg, te_cfgs[-1]["projection_dim"])
        part = "VAE"
        vae_cfg = lc.vae_config(shapes, family, lc.sidecar_scale_factor(original))
    except (KeyError, StopIteration, ValueError, IndexError) as e:
        raise TrainingError(f"{path}: cannot infer the {part} layout from the tensor shapes ({e!s:.120})") from None
    if unet_cfg["in_channels"] != vae_cfg["latent_channels"]:
        raise TrainingError(f"{path}: the UNet takes {unet_cfg['in_channels']} input channels but the VAE makes "
                            f"{vae_cfg['latent_channels']} (an inpainting/instruct model); LoRA training needs a "
                            "text-to-image base")
    return unet_cfg, vae_cfg, te_cfgs


def build_models(path: str, family: str, unet_cfg: dict, vae_cfg: dict, te_cfgs: list, tokenizers: list,
                 read: Callable[[tuple], dict], dtype: torch.dtype):
    """Empty models from the configs, loaded strictly with diffusers' conversion of ``read(prefixes)``
    (the ldm tensors under those prefixes); returns (unet, vae, [text encoders])."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = _empty(UNet2DConditionModel, **unet_cfg)
    _load(unet, sfu.convert_ldm_unet_checkpoint(read((lc.UNET,)), unet_cfg), path, "UNet", dtype)
    vae = _empty(AutoencoderKL, **vae_cfg)
    _load(vae, sfu.convert_ldm_vae_checkpoint(read((lc.VAE,)), vae_cfg), path, "VAE", dtype)
    tes = []
    prefixes = lc.TE_PREFIXES[family]
    for i, (prefix, cfg, tok) in enumerate(zip(prefixes, te_cfgs, tokenizers)):
        what = f"text encoder {i + 1}" if len(prefixes) > 1 else "text encoder"
        config = CLIPTextConfig(**_text_config(cfg, tok, path, what))
        cls = CLIPTextModelWithProjection if (family == "sdxl" and i == 1) else CLIPTextModel
        te = _empty(cls, config)
        sd = read((prefix,))
        if prefix.endswith(".transformer."):  # CLIP-L in HF layout
            sd = sfu.convert_ldm_clip_checkpoint(sd)
            sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
                  for k, v in sd.items()}
        else:  # OpenCLIP: fused q/k/v, transposed projection
            sd = sfu.convert_open_clip_checkpoint(te, sd, prefix=prefix)
        tes.append(_load(te, sd, path, what, dtype))
    return unet, vae, tes


def load_single_file_parts(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
                           prediction_type: str | None = None,
                           tokenizer: str | os.PathLike | None = None) -> SingleFileModel:
    """Read, infer, convert and load every part of an SD1/SD2/SDXL single-file checkpoint."""
    from diffusers import DDPMScheduler

    from ..formats.checkpoint import open_checkpoint
    from .clip_tokenizer import clip_tokenizers

    path = os.fspath(path)
    if os.path.isdir(path):
        raise TrainingError(f"{path}: a folder; single-file loading takes a .safetensors checkpoint")
    ckpt = open_checkpoint(path)  # validates the header: truncated/garbage files fail here, naming the file
    shapes = ckpt.shapes()
    family = _check_layout(path, shapes)
    original, _ = lc.read_sidecar(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise TrainingError(f"prediction type {prediction_type!r}: use epsilon or v_prediction")
    pred = PREDICTION_TYPES.get(prediction_type or "") or lc.sidecar_prediction_type(original) or "epsilon"
    kinds = ["clip", "openclip"] if family == "sdxl" else ["openclip" if family == "sd2" else "clip"]
    toks = clip_tokenizers(kinds, tokenizer, path)

    unet_cfg, vae_cfg, te_cfgs = infer_configs(path, shapes, family, original, pred)
    unet, vae, tes = build_models(path, family, unet_cfg, vae_cfg, te_cfgs, toks,
                                  lambda prefixes: _read(ckpt, prefixes, dtype), dtype)
    unet, vae, tes = unet.to(device), vae.to(device), [te.to(device) for te in tes]
    sched = DDPMScheduler.from_config(SCHEDULER | {"prediction_type": pred})
    return SingleFileModel(family, unet, tes, toks, vae, sched, pred, os.path.splitext(os.path.basename(path))[0])


def load_single_file(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
                     clip_skip: int = 1, prediction_type: str | None = None,
                     tokenizer: str | os.PathLike | None = None) -> TrainHost:
    """Load an SD1/SD2/SDXL single-file checkpoint as a :class:`TrainHost` (UNet, text encoder(s), VAE,
    tokenizer(s), DDPM schedule; ``prediction_type``: argument, else the sidecar yaml, else epsilon)."""
    from .diffusers_host import diffusers_host

    m = load_single_file_parts(path, device, dtype, prediction_type, tokenizer)
    return diffusers_host(m.unet, m.text_encoders, m.tokenizers, m.vae, m.scheduler.alphas_cumprod,
                          m.prediction_type, clip_skip, m.name, scheduler_config=m.scheduler.config)
