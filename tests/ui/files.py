"""Real kohya LoRA files (safetensors.torch.save_file) and previews for the web UI tests.

The modules fit the demo model's UNet (cross-attention to_k/to_v: 64 -> 32, self-attention to_q:
32 -> 32), so the same files are shown in the Library, processed by the tools and applied by the
Generate page's sweep."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

MODULES = {  # kohya name -> (out, in) of the demo UNet's weight
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 64),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v": (32, 64),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn2_to_v": (32, 64),
}


def write_lora(path, seed: int = 0, rank: int = 4, alpha: float = 2.0, metadata: dict | None = None,
               scale: float = 0.5, repeat: int = 1) -> str:
    """A kohya LoRA over ``MODULES`` (``repeat`` > 1 adds copies under up_blocks_1.. names for more work)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    names = dict(MODULES)
    for i in range(1, repeat):
        for name, shape in MODULES.items():
            names[f"{name}_copy{i}"] = shape
    for name, (o, n) in names.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, n, generator=g) * scale
        sd[f"{name}.lora_up.weight"] = torch.randn(o, rank, generator=g) * scale
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sd_v1"}
    meta.update(metadata or {})
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    save_file(sd, os.fspath(path), metadata=meta)
    return os.fspath(path)


def write_preview(path, colour=(200, 40, 160)) -> str:
    from PIL import Image

    Image.new("RGB", (64, 64), colour).save(os.fspath(path))
    return os.fspath(path)


def lora_folder(root) -> str:
    """Two LoRAs with metadata (one with a preview and a description) and one in a sub-folder."""
    root = os.fspath(root)
    write_lora(os.path.join(root, "purple_style.safetensors"), seed=1,
               metadata={"ss_output_name": "PurpleStyle", "ss_training_comment": "trained on violet squares"})
    write_preview(os.path.join(root, "purple_style.png"))
    with open(os.path.join(root, "purple_style.txt"), "w", encoding="utf-8") as fh:
        fh.write("A test style <b>not bold</b>")
    write_lora(os.path.join(root, "green_things.safetensors"), seed=2, rank=8, alpha=8.0,
               metadata={"ss_output_name": "GreenThings"})
    write_lora(os.path.join(root, "sub", "big_one.safetensors"), seed=3, rank=8, repeat=1)
    return root


def write_demo_lora(folder, name: str = "demo_purple", seed: int = 11) -> str:
    """What ``lora-engine demo`` leaves in its output folder, cheaply: a LoRA for the demo model named
    like the demo's, written by our writer from seeded random factors, with the demo's kind of
    training metadata (output name, caption tag frequencies)."""
    import json

    from lora_engine.formats.writer import LoraTensors, write_kohya

    g = torch.Generator().manual_seed(seed)
    modules = {n: LoraTensors(torch.randn(4, i, generator=g) * 0.3, torch.randn(o, 4, generator=g) * 0.3, 4.0)
               for n, (o, i) in MODULES.items()}
    tags = {"concept_images": {"a purple circle": 3, "a purple square": 3, "a purple triangle": 2}}
    path = os.path.join(os.fspath(folder), name + ".safetensors")
    os.makedirs(os.fspath(folder), exist_ok=True)
    write_kohya(path, modules, {"ss_output_name": name, "ss_base_model_version": "sd_v1",
                                "ss_tag_frequency": json.dumps(tags)})
    return path
