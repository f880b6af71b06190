"""Real safetensors files written with safetensors.torch.save_file into tmp folders."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file


def write_lora(path, metadata=None, seed=0, rank=2, te2=False, numel=None) -> str:
    """A small kohya LoRA (one UNet attention projection, optionally an SDXL TE2 module)."""
    g = torch.Generator().manual_seed(seed)
    mod = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    width = 8 if numel is None else numel
    sd = {f"{mod}.lora_down.weight": torch.randn(rank, width, generator=g),
          f"{mod}.lora_up.weight": torch.randn(8, rank, generator=g),
          f"{mod}.alpha": torch.tensor(float(rank))}
    if te2:
        te = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
        sd.update({f"{te}.lora_down.weight": torch.randn(rank, 8, generator=g),
                   f"{te}.lora_up.weight": torch.randn(8, rank, generator=g)})
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    save_file(sd, os.fspath(path), metadata=metadata)
    return os.fspath(path)


@pytest.fixture
def lora_dir(tmp_path):
    root = tmp_path / "Lora"
    root.mkdir()
    return root
