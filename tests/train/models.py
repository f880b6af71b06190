"""Tiny real SD1-shaped parts for training tests: diffusers UNet + AutoencoderKL, transformers CLIP
text encoder and a real CLIPTokenizer over a letters-only vocabulary; a coloured-squares dataset."""
from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass

import torch
from PIL import Image

from tests.fixtures.models.tiny_sd import tiny_unet

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=32).eval()


def tiny_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ",.")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as fh:
        json.dump(vocab, fh)
    with open(os.path.join(folder, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         pad_token="<|endoftext|>", model_max_length=24)


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed + 1)
    cfg = CLIPTextConfig(vocab_size=80, hidden_size=12, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=24, hidden_act="quick_gelu", projection_dim=12,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def tiny_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@dataclass
class Parts:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    scheduler: object

    def host(self, prediction_type: str = "epsilon"):
        from lora_engine.train.diffusers_host import diffusers_host

        for m in (self.unet, self.text_encoder, self.vae):
            m.requires_grad_(False)
        return diffusers_host(self.unet, [self.text_encoder], [self.tokenizer], self.vae,
                              self.scheduler.alphas_cumprod, prediction_type, model_name="tiny")

    def save(self, folder: str) -> str:
        self.unet.save_pretrained(os.path.join(folder, "unet"))
        self.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
        self.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
        self.vae.save_pretrained(os.path.join(folder, "vae"))
        self.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
        return folder


def tiny_parts(tmp: str, seed: int = 0) -> Parts:
    return Parts(tiny_unet("sd1", seed), tiny_text_encoder(seed), tiny_tokenizer(os.path.join(tmp, "tok")),
                 tiny_vae(seed), tiny_scheduler())


def square_image(path: str, fg: str, bg: str, size=(40, 40)) -> None:
    im = Image.new("RGB", size, COLOURS[bg])
    w, h = size
    im.paste(COLOURS[fg], (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    im.save(path)


def make_dataset(folder: str, n: int = 4, size=(40, 40), captions: bool = True, sub: str = "") -> str:
    """``n`` coloured-square images (+ captions) in ``folder`` (or its subfolder ``sub``)."""
    target = os.path.join(folder, sub) if sub else folder
    os.makedirs(target, exist_ok=True)
    names = list(COLOURS)
    for i in range(n):
        fg, bg = names[i % 4], names[(i + 1 + i // 4) % 4]
        path = os.path.join(target, f"img{i}.png")
        square_image(path, fg, bg, size)
        if captions:
            with open(os.path.splitext(path)[0] + ".txt", "w") as fh:
                fh.write(f"{fg} square, {bg} background")
    return folder
