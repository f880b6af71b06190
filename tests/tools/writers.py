"""LoRA files written by real third-party writers (lycoris-lora, peft) with random non-zero tensors,
plus small independent helpers the tool tests share."""
from __future__ import annotations

import logging

import torch

from tests.formats.peft_oracle import randomize
from tests.oracle_models import tiny_unet

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def lycoris_file(path, seed: int, algo: str = "lora", dtype=torch.float32, **kw) -> str:
    """lycoris-lora's own writer (``save_weights``) on the tiny UNet; every tensor but α random."""
    from lycoris import create_lycoris

    net = create_lycoris(tiny_unet(seed=0), 1.0, linear_dim=kw.pop("linear_dim", 4), linear_alpha=kw.pop("linear_alpha", 2.0),
                         conv_dim=kw.pop("conv_dim", 4), conv_alpha=kw.pop("conv_alpha", 1.0), algo=algo, **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.endswith("alpha"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    net.save_weights(str(path), dtype, {"ss_base_model_version": "sd_v1"})
    return str(path)


def peft_folder(folder, seed: int, **config) -> str:
    """peft's own ``save_pretrained`` of a LoRA injected into the tiny UNet (random A/B)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_unet(seed=0), LoraConfig(init_lora_weights=False, **config))
    randomize(pm, seed)
    pm.save_pretrained(str(folder))
    return str(folder)


def deltas(lf, names=None) -> dict[str, torch.Tensor]:
    """{name: ΔW at strength 1} of a loaded file, in each module's natural shape (adapters' own math)."""
    out = {}
    for name, ma in lf.modules.items():
        if names is None or name in names:
            shape = ma.adapter.natural_shape()
            out[name] = ma.adapter.delta(torch.zeros(shape)).weight
    return out


def energy_after(delta: torch.Tensor, k: int) -> float:
    """Σ_{j>k} S_j² of ``delta`` flattened to (o, n), from ``torch.linalg.svdvals`` in float64."""
    s = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
    return float(s[k:].pow(2).sum())


def fro2(t: torch.Tensor) -> float:
    return float(t.double().pow(2).sum())
