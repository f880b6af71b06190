"""Merge several LoRAs (weights w_k, negative allowed) into one LoRA file.

Per module, the wanted delta is ΔW = Σ_k w_k · s_k · up_k @ down_k (s_k = α_k/r_k).

- ``exact``: concatenate along the rank: down = [down_1; …; down_K] (Σr_k, n),
  up = [w_1·s_1·up_1, …, w_K·s_K·up_K] (o, Σr_k), α = Σr_k (s = 1), so up@down = ΔW with no
  cross terms (unlike sd-scripts' merge_lora.py, which adds the ups and downs separately).
  A Tucker module (``lora_mid``) first becomes the equivalent LoCon: down'[a,i,h,w] =
  Σ_b mid[a,b,h,w]·down[b,i]. Other adapter types cannot be concatenated: use ``svd``.
- ``svd``: form ΔW densely (any base-independent adapter type: LoRA, LoHa, LoKr, full) and keep
  a truncated SVD (``tools.lowrank``): error² = the discarded singular values' energy.

A module present in only some inputs takes only their terms. DoRA/IA3/OFT/GLoRA modules depend on
the base weights and are refused with a clear error. Inputs made for different model families (an SDXL
and an SD1.x LoRA, told by ``library.summary.lora_architecture``) are refused unless forced.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..errors import ToolError
from ..finite import nonfinite
from ..formats import LoraFile, load_lora
from ..formats.writer import BuiltLora, LoraTensors, write_kohya
from ..keymap.diagnose import LABELS
from ..library.summary import lora_architecture
from ..patch.plan import MAX_STRENGTH
from .convert_dit import kohya_dialect
from .lowrank import adapter_bias, dense_delta, factor, factor_product, locon_factors
from .naming import titled, unify_te_names
from .progress import Ticker

FAMILY_LABELS = {**LABELS, "other": "a DiT family (SD3/Flux/...)"}


@dataclass(frozen=True)
class MergeInput:
    lora: LoraFile
    weight: float = 1.0


@dataclass(frozen=True)
class ModuleReport:
    name: str
    rank: int
    retained_fro: float | None = None  # None: exact


def _target_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The 4-D (conv) shape when any input gives one, else the first."""
    return next((s for s in shapes if len(s) == 4), shapes[0])


def _exact_module(name: str, terms: list[tuple[float, object]], dtype: torch.dtype) -> LoraTensors:
    for _, a in terms:
        if a.kind != "lora":
            raise ToolError(f"{name}: exact merge concatenates LoRA ranks; a {a.kind} module cannot be "
                            "concatenated (use --rank for an SVD merge)")
    shape = _target_shape([tuple(a.natural_shape()) for _, a in terms])
    up, down = _concat(name, terms, shape)
    down = down.reshape(down.shape[0], *shape[1:])
    if len(shape) == 4:
        up = up.reshape(*up.shape, 1, 1)
    return LoraTensors(down.to(dtype).contiguous(), up.to(dtype).contiguous(), float(down.shape[0]))


def _concat(name: str, terms, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """up = [w_k·s_k·up_k] (o, Σr), down = [down_k] (Σr, n): up @ down = Σ w_k·ΔW_k."""
    ups, downs = [], []
    for w, a in terms:
        up, down = locon_factors(a)
        if up.shape[0] != shape[0] or down.shape[1] != torch.Size(shape[1:]).numel():
            raise ToolError(f"{name}: inputs target different shapes ({list(shape)} vs {list(a.natural_shape())})")
        ups.append((w * a.scale) * up)
        downs.append(down)
    return torch.cat(ups, 1), torch.cat(downs, 0)


def _svd_module(name: str, terms, dtype, rank: int, method: str, param, device) -> tuple[LoraTensors, float]:
    if all(a.kind == "lora" for _, a in terms):  # factored: SVD of the concatenation, no dense ΔW
        shape = _target_shape([tuple(a.natural_shape()) for _, a in terms])
        up, down = _concat(name, terms, shape)
        f = factor_product(up, down, shape, method, param, rank, device)
        return LoraTensors(f.down.to(dtype), f.up.to(dtype), float(f.rank)), f.retained_fro
    dense = [(w, dense_delta(name, a)) for w, a in terms]
    shape = _target_shape([tuple(d.shape) for _, d in dense])
    total = None
    for w, d in dense:
        if d.numel() != torch.Size(shape).numel():
            raise ToolError(f"{name}: inputs target different shapes ({list(shape)} vs {list(d.shape)})")
        d = w * d.reshape(shape)
        total = d if total is None else total + d
    f = factor(total, method, param, rank, device)
    return LoraTensors(f.down.to(dtype), f.up.to(dtype), float(f.rank)), f.retained_fro


def _collect(inputs: list[MergeInput]) -> dict[str, list[tuple[float, object]]]:
    names = unify_te_names([list(i.lora.modules) for i in inputs])
    terms: dict[str, list[tuple[float, object]]] = {}
    for inp, mapping in zip(inputs, names):
        for name, ma in inp.lora.modules.items():
            terms.setdefault(mapping[name], []).append((float(inp.weight), ma.adapter))
    return terms


def _default_dtype(inputs: list[MergeInput]) -> torch.dtype:
    for inp in inputs:
        for ma in inp.lora.modules.values():
            t = getattr(ma.adapter, "down", None)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t.dtype
    return torch.float32


def mixed_families(inputs: list[MergeInput]) -> str | None:
    """One line when the inputs were made for different model families (each file's family and what
    says so), else None. Files whose family cannot be told are not counted."""
    seen: dict[str, tuple[str, str]] = {}
    for inp in inputs:
        arch, source = lora_architecture(inp.lora)
        if arch != "unknown":
            seen.setdefault(arch, (os.path.basename(inp.lora.path), source))
    if "flux/sd3" in seen and ({"flux", "sd3"} & set(seen)):
        del seen["flux/sd3"]  # diffusers transformer_blocks names only: either, so no clash with one of them
    if len(seen) < 2:
        return None
    return "inputs made for different model families: " + ", ".join(
        f"{file} is {FAMILY_LABELS.get(arch, arch)} ({source})" for arch, (file, source) in seen.items())


def merge_loras(inputs: list[MergeInput], rank: int | None = None, method: str = "fixed", param: float | None = None,
                dtype: torch.dtype | None = None, device=None, progress=None, cancel=None, force: bool = False,
                max_weight: float = MAX_STRENGTH) -> BuiltLora:
    """``rank=None`` → exact (concatenated ranks); else SVD to ``rank`` (a cap for dynamic methods).
    Inputs made for different model families are refused unless ``force``; a module whose merged
    factors are not finite is left out; |weight| > ``max_weight`` is warned about."""
    if not inputs:
        raise ToolError("merge needs at least one LoRA")
    mixed = mixed_families(inputs)
    if mixed is not None and not force:
        raise ToolError(f"{mixed}; nothing merged (forcing it merges them anyway)")
    dtype = dtype or _default_dtype(inputs)
    terms = _collect(inputs)
    result = BuiltLora({}, warnings=[] if mixed is None else [f"{mixed}; merged as forced"])
    result.warnings += [f"{os.path.basename(i.lora.path)}: weight {i.weight:g} is outside ±{max_weight:g}"
                        for i in inputs if not math.isfinite(i.weight) or abs(i.weight) > max_weight]
    ticker = Ticker(len(terms), progress, cancel)
    for name, module_terms in terms.items():
        ticker.check()
        if any(adapter_bias(a) is not None for _, a in module_terms):
            result.warnings.append(f"{name}: bias delta dropped (kohya LoRA files cannot store a bias)")
        if rank is None:
            module, kept = _exact_module(name, module_terms, dtype), None
        else:
            module, kept = _svd_module(name, module_terms, dtype, rank, method, param, device)
        if nonfinite(module.up) or nonfinite(module.down):
            result.warnings.append(f"{name}: merged factors are not finite; module left out")
        else:
            result.modules[name] = module
            result.reports.append(ModuleReport(name, module.rank, kept))
        ticker.tick(name)
    result.modules, notes = kohya_dialect(result.modules, {})
    result.warnings += notes
    result.metadata = _merge_metadata(inputs, rank, method, param)
    return result


def _merge_metadata(inputs: list[MergeInput], rank, method, param) -> dict[str, str]:
    import json

    meta = {"ss_merged_from": json.dumps([{"file": os.path.basename(i.lora.path), "weight": i.weight} for i in inputs]),
            "ss_merge_method": "concat" if rank is None else f"svd:{method}" + (f":{param}" if param is not None else "")}
    versions = {i.lora.metadata.get("ss_base_model_version") for i in inputs} - {None}
    if len(versions) == 1:
        meta["ss_base_model_version"] = versions.pop()
    return meta


def merge_files(specs: list[tuple[str, float]], out: str | os.PathLike, **kwargs) -> BuiltLora:
    """Load ``(path, weight)`` pairs, merge (see :func:`merge_loras`), write ``out`` atomically."""
    inputs = [MergeInput(load_lora(p), w) for p, w in specs]
    result = merge_loras(inputs, **kwargs)
    result.metadata = write_kohya(out, result.modules, titled(result.metadata, out))
    return result
