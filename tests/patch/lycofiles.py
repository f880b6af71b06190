"""LyCORIS files (every algorithm) written by lycoris-lora's own writer on a tiny SD UNet.

lycoris patches the forward of the model it wraps, so files are written on a separate copy
of the model; values are randomised through lycoris's own state-dict loading (its initialisers
zero one factor, which would make every delta vanish).
"""
from __future__ import annotations

import logging

import torch
from safetensors.torch import load_file, save_file

from tests.models.tiny_sd import TinySD

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

ALGOS = {
    "locon": dict(algo="lora"),
    "locon-tucker": dict(algo="lora", use_tucker=True),
    "loha": dict(algo="loha"),
    "lokr": dict(algo="lokr", factor=4),
    "ia3": dict(algo="ia3"),
    "glora": dict(algo="glora"),
    "full": dict(algo="full"),
    "diag-oft": dict(algo="diag-oft", block_size=4),
    "dora": dict(algo="lora", dora_wd=True),
}


def write_lycoris(path, arch: str, algo: str, seed: int = 0, scale: float = 0.1) -> None:
    from lycoris import create_lycoris

    kw = dict(ALGOS[algo])
    name = kw.pop("algo")
    unet = TinySD.build(arch).unet
    net = create_lycoris(unet, 1.0, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0, algo=name, **kw)
    net.apply_to()
    net.save_weights(str(path), torch.float32, {})
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v if k.endswith((".alpha", ".on_input")) else torch.randn(v.shape, generator=g) * scale)
          for k, v in load_file(str(path)).items()}
    save_file(sd, str(path))
