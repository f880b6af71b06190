"""What the trainer needs from a host: the model parts and four functions, nothing host-specific.

A host (diffusers, A1111, ComfyUI) fills a :class:`TrainHost`:

- ``root``: an ``nn.Module`` whose ``state_dict`` keys the engine's key map understands (e.g. a
  ``ModuleDict(unet=..., text_encoder=...)``, or A1111's ``LatentDiffusion``); LoRAs hook into it;
- ``denoise(noisy_latents, t, cond, sizes) -> prediction`` (ε or v, per ``prediction_type``);
- ``encode_text(captions) -> Cond`` (differentiable when the text encoder is trained);
- ``encode_image(pixels in [-1, 1] (B,3,H,W), generator) -> latents`` already multiplied by the
  VAE scaling factor (identity for pixel-space models);
- ``alphas_cumprod`` (T,) of the training noise schedule, ᾱ_t;
- ``latent_factor``: pixels per latent cell (8 for SD), so buckets are multiples of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Cond:
    """Text conditioning of a batch: ``context`` (B, L, C) and optional pooled embedding (B, P)."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def detach(self) -> "Cond":
        return Cond(self.context.detach(), None if self.pooled is None else self.pooled.detach())

    @staticmethod
    def cat(parts: list["Cond"]) -> "Cond":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Cond(torch.cat([p.context for p in parts]), pooled)


@dataclass
class TrainHost:
    root: torch.nn.Module
    denoise: Callable[[torch.Tensor, torch.Tensor, Cond, list[tuple[int, int]]], torch.Tensor]
    encode_text: Callable[[list[str]], Cond]
    encode_image: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"  # or "v_prediction"
    latent_factor: int = 8
    base_model_version: str = "sd_v1"
    model_name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    text_encoders: tuple = ()
    unet: torch.nn.Module | None = None
    sample: Callable[[list[str], int], list] | None = None  # (prompts, step) -> images, optional
    gradient_checkpointing: Callable[[bool], None] | None = None

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, not {self.prediction_type!r}")
