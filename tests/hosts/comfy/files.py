"""LoRA files for the node tests, written by real writers onto the tiny model's own modules.

- ``kohya_lora``: kohya-style ``lora_unet_*``/``lora_te_*`` (``lora_te2_*`` for SDXL's second encoder)
  ``lora_down``/``lora_up``/``alpha`` (safetensors), for every attention projection of the UNet and every
  q/k/v/out/fc projection of the text encoders;
- ``lycoris_file``: lycoris-lora's own writer (LoCon with 3×3 convs, LoHa, LoKr, DoRA, OFT), random
  trainable tensors, names renamed ``lycoris_`` → ``lora_unet_`` as kohya's trainer writes them;
- ``diffusers_peft_lora``: peft's own ``LoraConfig`` on the diffusers UNet (attention to_q/k/v/out.0,
  the keys ComfyUI skips for SD1.x/SDXL), saved as diffusers does (``unet.<path>.lora_A/B.weight``).
"""
from __future__ import annotations

import copy
import logging
import warnings

import torch
from safetensors.torch import load_file, save_file

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

LYCORIS = {
    "locon": dict(algo="lora"),
    "loha": dict(algo="loha"),
    "lokr": dict(algo="lokr", factor=4),
    "dora": dict(algo="lora", dora_wd=True, wd_on_output=True),
    "dora-in": dict(algo="lora", dora_wd=True, wd_on_output=False),
    "oft": dict(algo="diag-oft", block_size=4),
}


def _randn(shape, g, scale=0.2):
    return torch.randn(shape, generator=g) * scale


def kohya_lora(path, m, rank: int = 4, alpha: float = 2.0, seed: int = 3, te_prefix: str = "lora_te_") -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    targets = [("lora_unet_", n, mod) for n, mod in m.unet.named_modules()
               if isinstance(mod, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
               and ".attn" in n]
    for te, prefix in zip(m.text_encoders, (te_prefix, "lora_te2_")):
        nest = "" if hasattr(te, "text_model") else "text_model."
        targets += [(prefix, nest + n, mod) for n, mod in te.named_modules() if isinstance(mod, torch.nn.Linear)
                    and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")]
    for prefix, name, mod in targets:
        key = prefix + name.replace(".", "_")
        sd[key + ".lora_down.weight"] = _randn((rank, mod.in_features), g)
        sd[key + ".lora_up.weight"] = _randn((mod.out_features, rank), g)
        sd[key + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                              "ss_tag_frequency": '{"10_cat": {"cat": 9, "mat": 4, "blue sky": 7}}'})


def lycoris_file(path, m, case: str, seed: int = 7) -> None:
    from lycoris import create_lycoris

    kw = dict(LYCORIS[case])
    algo = kw.pop("algo")
    net = create_lycoris(copy.deepcopy(m.unet), 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=1.0,
                         algo=algo, **kw)
    net.apply_to()
    net.save_weights(str(path), torch.float32, {})
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in load_file(str(path)).items():
        name = "lora_unet_" + k[len("lycoris_"):] if k.startswith("lycoris_") else k
        keep = k.endswith((".alpha", ".on_input"))
        sd[name] = v if keep else _randn(v.shape, g) + (1.0 if k.endswith((".rescale", ".dora_scale")) else 0.0)
    save_file(sd, str(path))


def diffusers_peft_lora(path, m, rank: int = 4, seed: int = 5, bias: bool = False) -> int:
    """Returns the number of adapted modules. ``bias``: PEFT's ``lora_bias`` (a ``lora_B.bias`` per module)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    unet = copy.deepcopy(m.unet)
    pm = get_peft_model(unet, LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, lora_bias=bias,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():  # peft 0.21 takes a 1-D lora_B.bias for an unsharded ZeRO-3 tensor
        warnings.filterwarnings("ignore", message=".*invalid shape.*")
        state = get_peft_model_state_dict(pm)
    sd = {"unet." + k.removeprefix("base_model.model."): _randn(v.shape, g) for k, v in state.items()}
    save_file(sd, str(path))
    return sum(k.endswith("lora_A.weight") for k in sd)
