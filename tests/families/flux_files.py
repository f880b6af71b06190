"""Flux LoRA files for tests, in the dialects people download: written by peft + diffusers
(``transformer.<diffusers path>.lora_A/B``), kohya sd-scripts (``lora_unet_<native path with _>``,
``lora_down/up`` + ``alpha``) and ComfyUI-native (``diffusion_model.<native path>``)."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

# diffusers leaf names LoRA trainers target on Flux (ai-toolkit / diffusers scripts)
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
                "context_embedder"]

# native modules kohya's lora_flux trains (double/single blocks; final layer and embedders by option)
KOHYA_DOUBLE = ["img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin",
                "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin"]
KOHYA_SINGLE = ["linear1", "linear2", "modulation.lin"]
KOHYA_TOP = ["img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1"]


def peft_file(model, path, seed: int, r: int = 4, alpha: int = 8, targets=PEFT_TARGETS, pipeline=None) -> None:
    """A diffusers-format file written by the real writers: peft adapts a copy of ``model`` (random A
    and B), diffusers' ``FluxPipeline.save_lora_weights`` saves it with its adapter metadata."""
    import copy

    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    m = copy.deepcopy(model)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(cfg, m)
    sd = get_peft_model_state_dict(m)
    (pipeline or FluxPipeline).save_lora_weights(str(path), transformer_lora_layers=sd,
                                                 transformer_lora_adapter_metadata=cfg.to_dict())


def native_lora(native_shapes: dict, seed: int, modules: list[str], r: int = 4, alpha: float = 2.0,
                spelling: str = "kohya") -> dict[str, torch.Tensor]:
    """LoRA tensors for native modules: kohya ``lora_unet_<path with _>.lora_down.weight`` or ComfyUI
    ``diffusion_model.<path>.lora_down.weight`` (both with ``.alpha``)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module in modules:
        o, i = native_shapes[module + ".weight"]
        key = "lora_unet_" + module.replace(".", "_") if spelling == "kohya" else "diffusion_model." + module
        out[key + ".lora_down.weight"] = torch.randn(r, i, generator=g) * 0.1
        out[key + ".lora_up.weight"] = torch.randn(o, r, generator=g) * 0.1
        out[key + ".alpha"] = torch.tensor(alpha)
    return out


def flux_modules(native_shapes: dict, double=KOHYA_DOUBLE, single=KOHYA_SINGLE, top=KOHYA_TOP) -> list[str]:
    mods = [m for m in top if m + ".weight" in native_shapes]
    i = 0
    while f"double_blocks.{i}.img_attn.qkv.weight" in native_shapes:
        mods += [f"double_blocks.{i}.{m}" for m in double]
        i += 1
    i = 0
    while f"single_blocks.{i}.linear1.weight" in native_shapes:
        mods += [f"single_blocks.{i}.{m}" for m in single]
        i += 1
    return mods


def write(tensors: dict, path) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def xlabs_lora(native_shapes: dict, seed: int, r: int = 4) -> dict[str, torch.Tensor]:
    """An x-flux LoRA: ``<block>.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`` on double blocks,
    ``qkv_lora`` (linear1's q, k, v rows) and ``proj_lora`` (linear2) on single blocks; no alpha."""
    g = torch.Generator().manual_seed(seed)
    h = native_shapes["img_in.weight"][0]
    out = {}

    def pair(key, o, i):
        out[key + ".down.weight"] = torch.randn(r, i, generator=g) * 0.1
        out[key + ".up.weight"] = torch.randn(o, r, generator=g) * 0.1

    i = 0
    while f"double_blocks.{i}.img_attn.qkv.weight" in native_shapes:
        for n in ("1", "2"):
            pair(f"double_blocks.{i}.processor.qkv_lora{n}", 3 * h, h)
            pair(f"double_blocks.{i}.processor.proj_lora{n}", h, h)
        i += 1
    i = 0
    while f"single_blocks.{i}.linear1.weight" in native_shapes:
        pair(f"single_blocks.{i}.processor.qkv_lora", 3 * h, h)
        pair(f"single_blocks.{i}.processor.proj_lora", h, native_shapes[f"single_blocks.{i}.linear2.weight"][1])
        i += 1
    return out
