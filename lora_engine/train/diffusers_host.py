"""The diffusers implementation of :class:`~lora_engine.train.host.TrainHost`.

SD1/SD2: ``context`` = CLIP last hidden state (``clip_skip`` k > 1: hidden state −k, then the
final layer norm). SDXL (two encoders): ``context`` = concat(te1 h[−2], te2 h[−2]) on features,
``pooled`` = te2 ``text_embeds``, ``time_ids`` = (h, w, 0, 0, h, w) of the bucket.
Latents: ``z = (E(x).sample(g) − shift) · scaling_factor``.
"""
from __future__ import annotations

import os

import torch

from ..errors import TrainingError
from .host import Cond, TrainHost


def _tokens(tokenizer, te, captions: list[str], device) -> torch.Tensor:
    n = min(int(tokenizer.model_max_length), int(te.config.max_position_embeddings))
    ids = tokenizer(captions, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


def _hidden(te, ids: torch.Tensor, skip: int, final_norm: bool):
    out = te(ids, output_hidden_states=True)
    h = out.hidden_states[-skip] if skip > 1 else out.last_hidden_state
    if skip > 1 and final_norm:
        norm = getattr(te, "text_model", te).final_layer_norm
        h = norm(h)
    return h, out


def _version(unet, n_te: int, prediction_type: str) -> str:
    if n_te >= 2 or getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl_base_v1-0"
    if getattr(unet.config, "use_linear_projection", False):
        return "sd_v2_768_v" if prediction_type == "v_prediction" else "sd_v2"
    return "sd_v1"


def _sampler(unet, vae, encode_text, denoise, scheduler_config, size, factor, scaling, shift,
             steps: int = 20, guidance: float = 7.0):
    """``sample(prompts, step) -> [PIL.Image]``: DDIM, classifier-free guidance
    ``ε = ε_u + g·(ε_c − ε_u)``, seed = prompt index (the same noise at every step, so samples compare)."""
    from diffusers import DDIMScheduler
    from PIL import Image

    def sample(prompts: list[str], step: int) -> list:
        sched = DDIMScheduler.from_config(scheduler_config)
        sched.set_timesteps(steps)
        dev, images = next(unet.parameters()).device, []
        w, h = size
        for i, prompt in enumerate(prompts):
            g = torch.Generator(device=dev).manual_seed(i)
            lat = torch.randn((1, unet.config.in_channels, h // factor, w // factor), generator=g, device=dev)
            cond = Cond.cat([encode_text([""]), encode_text([prompt])])
            for t in sched.timesteps:
                x = sched.scale_model_input(torch.cat([lat, lat]), t)
                u, c = denoise(x, t.reshape(1).expand(2).to(dev), cond, [size, size]).float().chunk(2)
                lat = sched.step(u + guidance * (c - u), t, lat).prev_sample
            px = vae.decode((lat / scaling + shift).to(vae.dtype)).sample[0].float()
            px = ((px.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            images.append(Image.fromarray(px))
        return images

    return sample


def _text_fn(tes, toks, device, clip_skip: int):
    """``encode_text(captions) -> Cond`` for one (SD1/SD2) or two (SDXL) CLIP encoders."""

    def encode_text(captions: list[str]) -> Cond:
        if len(tes) == 1:
            h, _ = _hidden(tes[0], _tokens(toks[0], tes[0], captions, device), clip_skip, True)
            return Cond(h)
        h1, _ = _hidden(tes[0], _tokens(toks[0], tes[0], captions, device), max(2, clip_skip), False)
        h2, out2 = _hidden(tes[1], _tokens(toks[1], tes[1], captions, device), max(2, clip_skip), False)
        return Cond(torch.cat([h1, h2], dim=-1), out2.text_embeds)

    return encode_text


def _checkpointing(unet, tes):
    """Switch activation checkpointing on the UNet and the text encoders."""

    def checkpointing(on: bool) -> None:
        (unet.enable_gradient_checkpointing if on else unet.disable_gradient_checkpointing)()
        for te in tes:  # transformers >= 5 renamed the switch
            name = "activation_checkpointing" if hasattr(te, "activation_checkpointing_enable") else \
                "gradient_checkpointing"
            if hasattr(te, f"{name}_enable"):
                getattr(te, f"{name}_enable" if on else f"{name}_disable")()

    return checkpointing


def diffusers_host(unet, text_encoders, tokenizers, vae, alphas_cumprod: torch.Tensor,
                   prediction_type: str = "epsilon", clip_skip: int = 1, model_name: str = "",
                   scheduler_config=None, sample_size: int | None = None) -> TrainHost:
    """Build the host from loaded diffusers/transformers parts (nothing is copied). With a scheduler
    config, ``host.sample`` renders preview images (DDIM, 20 steps, CFG 7) at ``sample_size`` px."""
    tes, toks = list(text_encoders), list(tokenizers)
    if len(tes) != len(toks) or not tes:
        raise TrainingError(f"need one tokenizer per text encoder, got {len(toks)} for {len(tes)}")
    parts = {"unet": unet, "text_encoder": tes[0]}
    if len(tes) == 2:
        parts["text_encoder_2"] = tes[1]
    root = torch.nn.ModuleDict(parts)
    device = next(unet.parameters()).device
    scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0) if vae is not None else 1.0
    shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0) if vae is not None else 0.0

    encode_text = _text_fn(tes, toks, device, clip_skip)

    def encode_image(pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if vae is None:
            return pixels
        pixels = pixels.to(device=device, dtype=vae.dtype)
        dist = vae.encode(pixels).latent_dist
        return ((dist.sample(generator) - shift) * scaling).float()

    def denoise(latents, t, cond: Cond, sizes):
        dtype = unet.dtype  # a half-precision base gets half inputs; autocast handles the fp32 case
        kwargs = {}
        if cond.pooled is not None:
            ids = torch.tensor([[h, w, 0, 0, h, w] for (w, h) in sizes], dtype=dtype, device=latents.device)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(dtype), "time_ids": ids}
        return unet(latents.to(dtype), t, encoder_hidden_states=cond.context.to(dtype), **kwargs).sample

    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    sample = None
    if scheduler_config is not None and vae is not None:
        size = sample_size or int(unet.config.sample_size) * factor
        sample = _sampler(unet, vae, encode_text, denoise, scheduler_config, (size, size), factor, scaling, shift)
    return TrainHost(root=root, denoise=denoise, encode_text=encode_text, encode_image=encode_image,
                     alphas_cumprod=alphas_cumprod.float(), prediction_type=prediction_type, latent_factor=factor,
                     base_model_version=_version(unet, len(tes), prediction_type), model_name=model_name,
                     device=device, text_encoders=tuple(tes), unet=unet,
                     gradient_checkpointing=_checkpointing(unet, tes), sample=sample)


def load_diffusers_folder(folder: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
                          clip_skip: int = 1) -> TrainHost:
    """Load a diffusers model folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    folder = os.fspath(folder)
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(folder, part)):
            raise TrainingError(f"{folder}: not a diffusers model folder (no {part}/ inside)")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).to(device)
    tes = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).to(device)]
    toks = [AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")]
    if os.path.isdir(os.path.join(folder, "text_encoder_2")):
        tes.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2",
                                                               torch_dtype=dtype).to(device))
        toks.append(AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
    vae = None
    if os.path.isdir(os.path.join(folder, "vae")):
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).to(device)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    for m in (unet, vae, *tes):
        if m is not None:
            m.requires_grad_(False).eval()
    return diffusers_host(unet, tes, toks, vae, sched.alphas_cumprod, sched.config.prediction_type, clip_skip,
                          os.path.basename(os.path.normpath(folder)), scheduler_config=sched.config)
