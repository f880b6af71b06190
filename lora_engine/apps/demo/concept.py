"""Teach the demo model a new concept with the project's trainer (:mod:`lora_engine.train`).

The concept is the colour ``purple``: the base model has the word in its vocabulary but never saw
it in training, so ``"a purple circle"`` draws no purple. The training set is written as a
normal kohya-style image folder (PNG + ``.txt`` caption per image) and trained through
:class:`lora_engine.train.Trainer` on a :class:`~lora_engine.train.TrainHost` of the demo model
(pixel space: ``encode_image`` is the identity and ``latent_factor`` is 1), so the demo runs the
same code a user's training run does and writes a kohya LoRA file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .dataset import CONCEPT_COLOUR, SHAPES, random_specs, render
from .diffusion import train_scheduler
from .model import RESOLUTION, DemoModel

# Dataset settings for training on the demo model: its own pixel grid, no buckets (used by the CLI and the demo).
DATASET = {"resolution": RESOLUTION, "enable_buckets": False, "bucket_step": 1}


@dataclass(frozen=True)
class ConceptSettings:
    """How the demo LoRA is trained (defaults: a few CPU minutes on 2 cores)."""

    images: int = 48
    steps: int = 240
    batch_size: int = 8
    rank: int = 4
    alpha: float = 4.0
    unet_lr: float = 2e-3
    te_lr: float = 1e-3
    train_text_encoder: bool = True
    seed: int = 7


def write_concept_images(folder: str, n: int, seed: int) -> list[str]:
    """``n`` pictures of purple shapes with captions ``"a purple {shape}"``; returns the image paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, spec in enumerate(random_specs(n, (CONCEPT_COLOUR,), SHAPES, seed=seed)):
        stem = os.path.join(folder, f"{i:03d}")
        arr = (render(spec, RESOLUTION) * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as fh:
            fh.write(spec.caption + "\n")
        paths.append(stem + ".png")
    return paths


def demo_host(model: DemoModel):
    """The :class:`~lora_engine.train.TrainHost` of the demo model (pixel space, v prediction)."""
    from ...train import Cond, TrainHost

    def denoise(x, t, cond: Cond, sizes):
        return model(x, t, cond.context)

    return TrainHost(root=model, denoise=denoise, encode_text=lambda caps: Cond(model.encode(caps)),
                     encode_image=lambda pixels, generator: pixels,
                     alphas_cumprod=train_scheduler().alphas_cumprod.float(), prediction_type="v_prediction",
                     latent_factor=1, base_model_version="sd_v1", model_name="lora-engine demo base",
                     text_encoders=(model.text_encoder,), unet=model.unet, device=model.unet.device)


def train_concept(model: DemoModel, data_dir: str, output: str, settings: ConceptSettings = ConceptSettings(),
                  progress: Callable | None = None, log: Callable[[str], None] | None = None):
    """Train the LoRA on the images in ``data_dir`` and write it to ``output`` (kohya format).
    ``progress`` receives :class:`lora_engine.train.Progress` after every step."""
    from ...train import Trainer, build_config

    s = settings
    cfg = build_config({
        "data_dir": data_dir, "output": output, "steps": s.steps, "seed": s.seed,
        "unet_lr": s.unet_lr, "te_lr": s.te_lr, "weight_decay": 0.0, "save_precision": "fp32",
        "save_state": False, "output_name": os.path.splitext(os.path.basename(output))[0],
        "comment": f"lora-engine demo: the colour {CONCEPT_COLOUR!r} on the demo base model",
        "network": {"rank": s.rank, "alpha": s.alpha, "train_text_encoder": s.train_text_encoder},
        "dataset": {**DATASET, "batch_size": s.batch_size},
    })
    return Trainer(demo_host(model), cfg, progress=progress, log=log).run()
