"""Extract a LoRA from two checkpoints of the same architecture (sd-scripts
``extract_lora_from_models.py``): for every LoRA-targetable Linear/Conv weight (the key map's targets,
fused OpenCLIP q/k/v split into their row slices),

    ΔW = W_tuned − W_base  (fp32),  skipped when max|ΔW| ≤ min_diff,
    truncated SVD (``tools.lowrank``, fixed or dynamic rank; ``conv_rank`` for k×k convs), α = k.

So applying the result at strength 1 gives W_base + ΔW_k with ‖ΔW − ΔW_k‖²_F = Σ_{j>k} S_j², and
exactly W_tuned (up to fp32 rounding) when rank(ΔW) ≤ k. No quantile clamping is applied.
Names are kohya's: SD1/SD2 UNets in diffusers block names, SDXL in sgm names (``unet_naming``
overrides), first text encoder ``lora_te_`` (``lora_te1_`` for SDXL). Bias changes cannot be stored
in a LoRA and are counted in the warnings.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..adapters.base import COMPUTE
from ..errors import ToolError
from ..families import FAMILIES
from ..formats.writer import BuiltLora, LoraTensors, write_kohya
from ..keymap import build_keymap
from ..formats.checkpoint import open_checkpoint
from .convert_dit import kohya_dialect
from .lowrank import factor
from .naming import titled
from .progress import Ticker

SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed_", "label_emb", "out_")


@dataclass(frozen=True)
class ExtractReport:
    name: str
    rank: int
    retained_fro: float
    max_abs_diff: float


def _is_sgm(name: str) -> bool:
    return name.startswith("lora_unet_") and name[len("lora_unet_"):].startswith(SGM_ROOTS)


def kohya_names(keymap, unet_naming: str = "auto") -> dict:
    """{Target: the one kohya name to write for it} over the map's 2-D/4-D targets. On a diffusion
    transformer (Flux, SD3) whole weights only, under the model's own name (the first the map lists):
    the other tree's names for row slices of a fused weight would count those rows twice."""
    kohya_sgm = keymap.family is not None and keymap.family.kohya_naming == "ldm"  # SDXL
    sgm = kohya_sgm if unet_naming == "auto" else unet_naming == "sgm"
    te1 = "lora_te1_" if keymap.architecture in ("sdxl", "flux", "chroma", "sd3") else "lora_te_"
    chosen: dict = {}
    for name in keymap.names():
        t = keymap.lookup(name)
        if len(t.shape) not in (2, 4) or (keymap.family in FAMILIES and t.rows is not None):
            continue
        if name.startswith("lora_te_"):
            name = te1 + name[len("lora_te_"):]
        prev = chosen.get(t)
        if prev is None or (name.startswith("lora_unet_") and _is_sgm(name) == sgm and _is_sgm(prev) != sgm):
            chosen[t] = name
    return chosen


def _check_same(base, tuned) -> None:
    a, b = base.shapes(), tuned.shapes()
    diff = [k for k in a if k in b and a[k] != b[k]]
    if diff:
        raise ToolError(f"{tuned.path}: not the same architecture as {base.path} ({diff[0]}: {list(b[diff[0]])} vs {list(a[diff[0]])})")


def extract_lora(base_path: str, tuned_path: str, rank: int, conv_rank: int | None = None, method: str = "fixed",
                 param: float | None = None, min_diff: float = 0.0, dtype: torch.dtype | None = None,
                 unet_naming: str = "auto", device=None, progress=None, cancel=None) -> BuiltLora:
    base, tuned = open_checkpoint(base_path), open_checkpoint(tuned_path)
    _check_same(base, tuned)
    keymap = build_keymap(base.shapes())
    names = kohya_names(keymap, unet_naming)
    if not names:
        raise ToolError(f"{base_path}: no UNet or text encoder found in its keys")
    result = BuiltLora({})
    ticker = Ticker(len(names), progress, cancel)
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for target, name in names.items():
        ticker.check()
        if target.weight_key not in tuned:
            result.warnings.append(f"{name}: {target.weight_key} missing from {tuned_path}")
            ticker.tick(name)
            continue
        w0, w1 = _pair(base, tuned, target.weight_key, cache)
        delta = target.region(w1).to(COMPUTE) - target.region(w0).to(COMPUTE)
        biggest = float(delta.abs().max()) if delta.numel() else 0.0
        if biggest > min_diff:
            k4 = len(target.shape) == 4 and target.shape[2] * target.shape[3] > 1
            f = factor(delta, method, param, conv_rank if (k4 and conv_rank) else rank, device)
            out_dtype = dtype or w0.dtype
            result.modules[name] = LoraTensors(f.down.to(out_dtype), f.up.to(out_dtype), float(f.rank))
            result.reports.append(ExtractReport(name, f.rank, f.retained_fro, biggest))
        ticker.tick(name)
    _bias_warning(base, tuned, names, result)
    if not result.modules:
        raise ToolError(f"{tuned_path}: no targeted weight differs from {base_path} by more than {min_diff}")
    if keymap.family in FAMILIES:  # a diffusion transformer: sd-scripts' native names, fused where exact
        result.modules, notes = kohya_dialect(result.modules, {})
        result.warnings += notes
    result.metadata = {"ss_network_module": "networks.lora", "ss_base_model_version": _version(keymap.architecture),
                       "ss_training_comment": f"extracted by lora-engine: {os.path.basename(tuned_path)} − "
                                              f"{os.path.basename(base_path)}"}
    return result


def _pair(base, tuned, key: str, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Both versions of one weight; a fused weight's pair is kept while its other slices are pending."""
    if key not in cache:
        cache.clear()  # targets of one weight are consecutive in the map; keep at most one pair
        cache[key] = (base.read(key), tuned.read(key))
    return cache[key]


def _bias_warning(base, tuned, names: dict, result: BuiltLora) -> None:
    changed = 0
    for key in {t.bias_key for t in names if t.bias_key}:
        if key in tuned and not torch.equal(base.read(key), tuned.read(key)):
            changed += 1
    if changed:
        result.warnings.append(f"{changed} bias(es) of targeted layers differ; a LoRA cannot store bias changes")


def _version(arch: str) -> str:
    return {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "chroma": "chroma",
            "sd3": "sd3"}.get(arch, "unknown")


def extract_file(base_path: str, tuned_path: str, out: str | os.PathLike, rank: int, **kwargs) -> BuiltLora:
    result = extract_lora(base_path, tuned_path, rank, **kwargs)
    result.metadata = write_kohya(out, result.modules, titled(result.metadata, out))
    return result
