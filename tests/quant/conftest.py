"""Shared pieces of the quantized-base tests: a Flux block set (ComfyUI's tree) at width 256, LoRA files
on a few of its layers, the reference ``dequant(W₀) + Σ m·ΔW`` and the hosts' own merges."""
from __future__ import annotations

import pytest
import torch

# the layers the LoRAs touch (native Flux names), kept few so that a test stays a matter of seconds
MODULES_A = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "single_blocks.0.linear2"]
MODULES_B = ["double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj"]
RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="session")
def base_tree():
    from tests.fixtures.models.quantized import flux_blocks

    return flux_blocks(seed=5)


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory, base_tree):
    from lora_engine.engine import shapes_of
    from tests.fixtures.files.flux import native_lora, write

    folder = tmp_path_factory.mktemp("quant_loras")
    shapes = shapes_of(base_tree)
    a = native_lora(shapes, seed=11, modules=MODULES_A, r=RANK, alpha=ALPHA)
    b = native_lora(shapes, seed=12, modules=MODULES_B, r=RANK, alpha=ALPHA)
    return {"A": (write(a, folder / "a.safetensors"), a), "B": (write(b, folder / "b.safetensors"), b)}


def lora_delta(tensors: dict, module: str) -> torch.Tensor | None:
    """ΔW of one module of a kohya LoRA, in float64, by einsum (not the engine's code)."""
    key = "lora_unet_" + module.replace(".", "_")
    if key + ".lora_down.weight" not in tensors:
        return None
    down, up = tensors[key + ".lora_down.weight"].double(), tensors[key + ".lora_up.weight"].double()
    alpha = float(tensors[key + ".alpha"])
    return torch.einsum("or,ri->oi", up, down) * (alpha / down.shape[0])


def reference(w0: torch.Tensor, loras: list[tuple[dict, float]], module: str) -> torch.Tensor:
    """dequant(W₀) + Σ m·ΔW in float64."""
    ref = w0.double().clone()
    for tensors, m in loras:
        d = lora_delta(tensors, module)
        if d is not None:
            ref += m * d
    return ref


FP8_VALUES: dict = {}


def fp8_grid(dtype) -> torch.Tensor:
    """Every finite value of an fp8 type, sorted."""
    if dtype not in FP8_VALUES:
        v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
        FP8_VALUES[dtype] = torch.unique(v[torch.isfinite(v)])
    return FP8_VALUES[dtype]


def comfy_stochastic_merge(w: torch.Tensor, dtype, seed: int) -> torch.Tensor:
    """ComfyUI's fp8 merge, from its documented algorithm (comfy/float.py ``stochastic_rounding``): the
    fp32 patched weight goes to one of its two neighbouring fp8 values, the upper one with probability
    equal to the fraction of the gap below the value (a seeded generator per key). Returns fp32 values."""
    grid = fp8_grid(dtype)
    v = w.float().clamp(grid[0], grid[-1])
    hi_i = torch.searchsorted(grid, v).clamp(max=grid.numel() - 1)
    lo_i = (hi_i - (grid[hi_i] > v).long()).clamp(min=0)
    lo, hi = grid[lo_i], grid[hi_i]
    gap = (hi - lo).clamp_min(1e-30)
    g = torch.Generator().manual_seed(seed)
    up = torch.rand(v.shape, generator=g) < (v - lo) / gap
    return torch.where(up, hi, lo)


def stored_bytes(root: torch.nn.Module) -> dict:
    """Every parameter's stored bytes (raw blocks, packed codes, fp8 codes) and NF4 block scales."""
    out = {}
    for k, p in root.named_parameters():
        plain = p.detach().as_subclass(torch.Tensor)
        out[k] = plain.reshape(-1).contiguous().view(torch.uint8).clone()
        state = getattr(p, "quant_state", None)
        if state is not None:
            out[k + ":absmax"] = state.absmax.clone()
    return out


def same_bytes(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]
