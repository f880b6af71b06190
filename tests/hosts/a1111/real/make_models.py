"""Models for trying lora-engine in a real AUTOMATIC1111 1.10 without downloading any weights:
a full-size single-file checkpoint of one family with seeded random weights (fp16, the ldm/sgm layout
A1111 loads) and two kohya LoRAs over kohya's default targets of that family (ranks 8 and 4).

    python -m tests.hosts.a1111.real.make_models sd1|sd2|sdxl A1111/models

writes ``Stable-diffusion/<arch>_random.safetensors`` and ``Lora/<arch>_style0/1.safetensors``.
Needs the ``test`` extra (diffusers/transformers build the modules). SDXL needs about 15 GB of RAM.

    python -m tests.hosts.a1111.real.make_models hf-cache OPEN_CLIP_BPE_GZ

writes the offline Hugging Face cache entry A1111 reads for SD1/SDXL (``openai/clip-vit-large-patch14``:
tokenizer from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz``, CLIP-L text config), for machines
that cannot reach the Hub (set ``HF_HUB_OFFLINE=1`` when starting A1111).
"""
from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

from lora_engine.keymap import build_keymap
from tests.fixtures.models.full_sd import build_full
from tests.fixtures.models.hosts import diffusers_root
from tests.fixtures.models.ldm_checkpoint import write_ldm_checkpoint

RANKS = (8, 4)


def kohya_targets(arch: str, root) -> dict:
    """{kohya name: target} in the names kohya writes (SD1/SD2 UNet: diffusers blocks; SDXL: sgm UNet
    blocks and ``lora_te1_``/``lora_te2_`` encoders), over the benchmarks' default target set."""
    from bench.apply_setup import kohya_targets as default_targets

    keymap = build_keymap({k: tuple(v.shape) for k, v in root.state_dict().items()})
    return {("lora_te1_" + name[len("lora_te_"):] if arch == "sdxl" and name.startswith("lora_te_") else name): t
            for name, t in default_targets(keymap, arch).items()}  # kohya's SDXL spelling; the built-in knows only it


def write_loras(arch: str, root, folder: str) -> list[str]:
    targets = kohya_targets(arch, root)
    paths = []
    for i, rank in enumerate(RANKS):
        g = torch.Generator().manual_seed(1000 * (i + 1) + len(arch))
        sd = {}
        for name, t in targets.items():
            o, rest = t.shape[0], tuple(t.shape[1:])
            sd[f"{name}.lora_down.weight"] = (torch.randn(rank, *rest, generator=g) * 0.1).half()
            sd[f"{name}.lora_up.weight"] = (torch.randn(o, rank, *rest[1:], generator=g) * 0.1).half()
            sd[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
        paths.append(os.path.join(folder, f"{arch}_style{i}.safetensors"))
        save_file(sd, paths[-1], metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2),
                                           "ss_output_name": f"{arch}_style{i}"})
    return paths


def main(arch: str, models: str) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    m = build_full(arch, device="cpu", dtype=torch.float16)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4).half().eval()
    os.makedirs(os.path.join(models, "Lora"), exist_ok=True)
    os.makedirs(os.path.join(models, "Stable-diffusion"), exist_ok=True)
    for p in write_loras(arch, diffusers_root(m), os.path.join(models, "Lora")):
        print("wrote", p)
    ckpt = os.path.join(models, "Stable-diffusion", f"{arch}_random.safetensors")
    write_ldm_checkpoint(ckpt, arch, m.unet, m.text_encoders, vae, dtype=torch.float16)
    print("wrote", ckpt)


def write_hf_cache(bpe_gz: str) -> str:
    import json

    from lora_engine.train.clip_tokenizer import write_bpe_vocab

    root = os.path.expanduser("~/.cache/huggingface/hub/models--openai--clip-vit-large-patch14")
    snap = os.path.join(root, "snapshots", "0" * 40)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as fh:
        fh.write("0" * 40)
    write_bpe_vocab(bpe_gz, snap)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                layer_norm_eps=1e-5, model_type="clip_text_model")
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", model_type="clip_vision_model")
    files = {"special_tokens_map.json": special,
             "tokenizer_config.json": dict(special, model_max_length=77, do_lower_case=True, errors="replace",
                                           tokenizer_class="CLIPTokenizer"),
             "config.json": dict(architectures=["CLIPModel"], model_type="clip", projection_dim=768,
                                 text_config=text, vision_config=vision)}
    for name, content in files.items():
        with open(os.path.join(snap, name), "w") as fh:
            json.dump(content, fh, indent=1)
    return snap


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "hf-cache":
        print("wrote", write_hf_cache(sys.argv[2]))
        sys.exit(0)
    if len(sys.argv) != 3 or sys.argv[1] not in ("sd1", "sd2", "sdxl"):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
