"""Bake LoRAs into a checkpoint: W' = cast(W₀ + Σ_k m_k·ΔW_k(W₀)) for every touched weight (and
bias), everything else copied byte for byte.

The math is the engine's: ``patch.plan.build_plan`` maps each LoRA module onto the checkpoint's keys
through ``keymap.build_keymap`` (ldm/sgm single files; Flux.1/Chroma/SD3 single files in BFL/original
naming, bare or as ComfyUI's full checkpoint under ``model.diffusion_model.`` with
``text_encoders.{clip_l,clip_g,t5xxl}.transformer.``; diffusers folders with ``unet/`` or ``transformer/``),
and ``patch.delta.merged_weight`` gives W₀ + Σ ΔW in fp32 (one add, one cast per weight, exactly as the
merged patcher writes it). Fused weights (OpenCLIP q/k/v, Flux ``qkv``/``linear1``, SD3 ``qkv``) are
patched by row slices, a split LoRA's q/k/v/mlp pieces summed once per weight.

Streaming: the output header is known from the input header (same keys, dtypes, shapes), so it is
written first, then each tensor in data order: untouched tensors as raw byte copies in bounded
chunks, touched ones read, patched and written one at a time. Peak memory is a few times the largest
touched tensor plus the LoRAs, not the checkpoint (a 23.8 GB bf16 Flux.1-dev bakes in well under 2 GB:
bench/bench_bake.py --arch flux). A sharded diffusers component keeps its shards and index json: the
keys stay in the same files. Output is atomic (temporary name + ``os.replace``; a diffusers
folder is assembled in a temporary folder and renamed).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import torch

from ..errors import OutputExistsError, ToolError
from ..finite import nonfinite
from ..formats import load_lora
from ..formats.safetensors_writer import Entry, StreamWriter, atomic_dir, atomic_file
from ..keymap import build_keymap
from ..patch.delta import merged_weight
from ..patch.plan import PatchPlan, StackEntry, build_plan
from ..formats.checkpoint import Checkpoint, Part, copy_bytes, diffusers_weight_files, open_checkpoint
from .progress import Ticker


@dataclass(frozen=True)
class BakeLora:
    """One LoRA to bake: file and strengths for the text encoder(s) and the UNet (negative allowed)."""

    path: str
    te: float = 1.0
    unet: float = 1.0


@dataclass
class BakeResult:
    out: str
    touched: int = 0  # tensors rewritten
    copied: int = 0  # tensors copied bit for bit
    warnings: list[str] = field(default_factory=list)


def _bias_slot(plan: PatchPlan, slot: str, ckpt: Checkpoint) -> bool:
    """Whether the slot's bias is rewritten: it exists and some contribution carries a Δb."""
    target = plan.targets[slot]
    return bool(target.bias_key and target.bias_key in ckpt
                and any(c.adapter.has_bias_delta for c in plan.contributions[slot]))


class _Deltas:
    """Each slot's (ΔW, Δb) computed once from the original weight, kept until both are written."""

    def __init__(self, ckpt: Checkpoint, plan: PatchPlan, device=None):
        self.ckpt, self.plan = ckpt, plan
        self.device = torch.device(device or "cpu")
        self.memo: dict[str, list] = {}

    def get(self, slot: str, role: str, weight_region: torch.Tensor | None = None):
        if slot not in self.memo:
            target = self.plan.targets[slot]
            if weight_region is None:
                weight_region = target.region(self.ckpt.read(target.weight_key))
            w0 = weight_region.to(self.device, torch.float32)
            fresh = w0.data_ptr() != weight_region.data_ptr()
            # the new weight W₀ + ΔW exactly as the merged patcher computes it (same GEMM, same bits)
            w, db = merged_weight(self.plan.contributions[slot], w0, out=w0 if fresh else None)
            dw, db = (None if x is None else x.cpu() for x in (w, db))
            roles = {"weight"} | ({"bias"} if _bias_slot(self.plan, slot, self.ckpt) else set())
            self.memo[slot] = [dw, db, roles]
        entry = self.memo[slot]
        entry[2].discard(role)
        if not entry[2]:
            del self.memo[slot]
        return entry[0] if role == "weight" else entry[1]


def _tasks(plan: PatchPlan, ckpt: Checkpoint) -> dict[str, list[tuple[str, str]]]:
    """{tensor key: [(slot, "weight"|"bias")]} for every tensor the plan changes."""
    tasks: dict[str, list[tuple[str, str]]] = {}
    for slot, target in plan.targets.items():
        tasks.setdefault(target.weight_key, []).append((slot, "weight"))
        if _bias_slot(plan, slot, ckpt):
            tasks.setdefault(target.bias_key, []).append((slot, "bias"))
    return tasks


def _baked(ckpt: Checkpoint, key: str, jobs, deltas: _Deltas, warnings: list[str]) -> torch.Tensor:
    t = ckpt.read(key)
    for slot, role in jobs:
        target = deltas.plan.targets[slot]
        region = target.region(t)
        d = deltas.get(slot, role, region if role == "weight" else None)  # read before this region is written
        if d is None:
            continue
        if role == "weight":  # W₀ + ΔW in fp32, one cast (.to rounds like copy_)
            new = d.reshape(region.shape).to(region.dtype)
        else:  # b₀ + Δb; Δb is not used again
            new = d.reshape(region.shape).add_(region).to(region.dtype)
        if nonfinite(new) and not nonfinite(region):
            modules = ", ".join(c.module_name for c in deltas.plan.contributions[slot])
            warnings.append(f"{key}: the baked {role} would not be finite; kept as in the checkpoint ({modules})")
            continue
        region.copy_(new)
    return t


def _write_part(ckpt, part: Part, tasks, deltas, fh, ticker, result, extra_meta) -> None:
    info = part.file.info
    entries = [Entry(k, ti.dtype, ti.shape) for k, ti in info.items()]
    meta = dict(part.file.metadata) | extra_meta
    w = StreamWriter(fh, entries, meta or None)
    for e in w.order:
        ticker.check()
        full = part.prefix + e.key
        if full in tasks:
            w.write(e.key, _baked(ckpt, full, tasks[full], deltas, result.warnings))
            result.touched += 1
        else:
            ti = info[e.key]
            copy_bytes(part.file.path, ti.begin, ti.end, fh)
            w.wrote_raw(e.key, ti.end - ti.begin)
            result.copied += 1
        ticker.tick(full)
    w.close()


def plan_for(ckpt: Checkpoint, loras: list[BakeLora], force: bool = False) -> tuple[PatchPlan, list[str]]:
    """The plan of ``loras`` on this checkpoint; a LoRA made for another model family is left out
    unless ``force`` (then the modules that fit are baked)."""
    keymap = build_keymap(ckpt.shapes())
    stack = [StackEntry(load_lora(l.path), te=l.te, unet=l.unet, key=f"{i}:{l.path}") for i, l in enumerate(loras)]
    plan = build_plan(stack, keymap, force_foreign=force)
    warnings = [line for r in plan.reports.values() if (line := r.line())]
    if not plan.targets:
        raise ToolError(f"{ckpt.path}: no LoRA module matched this checkpoint ({keymap.architecture}); "
                        + ("; ".join(warnings) or "all strengths are 0"))
    return plan, warnings


def _bake_meta(loras: list[BakeLora]) -> dict[str, str]:
    return {"lora_engine_baked": json.dumps([{"file": os.path.basename(l.path), "te": l.te, "unet": l.unet}
                                             for l in loras])}


def bake_single(src: str, loras: list[BakeLora], out: str, progress=None, cancel=None, device=None,
                force: bool = False) -> BakeResult:
    ckpt = open_checkpoint(src)
    plan, warnings = plan_for(ckpt, loras, force)
    result = BakeResult(out, warnings=warnings)
    part = ckpt.parts[0]
    ticker = Ticker(len(part.file.info), progress, cancel)
    with atomic_file(out) as fh:
        _write_part(ckpt, part, _tasks(plan, ckpt), _Deltas(ckpt, plan, device), fh, ticker, result,
                    _bake_meta(loras))
    return result


def bake_diffusers(src: str, loras: list[BakeLora], out: str, overwrite: bool = False,
                   progress=None, cancel=None, device=None, force: bool = False) -> BakeResult:
    result = BakeResult(out)
    variants = diffusers_weight_files(src)
    if not variants:
        raise ToolError(f"{src}: no .safetensors weights under unet/, transformer/ or text_encoder*/")
    jobs = []
    for variant in variants:
        ckpt = open_checkpoint(src, variant)
        plan, warnings = plan_for(ckpt, loras, force)
        result.warnings.extend(w for w in warnings if w not in result.warnings)
        jobs.append((ckpt, plan))
    rewritten = {p.rel for ckpt, _ in jobs for p in ckpt.parts}
    ticker = Ticker(sum(len(p.file.info) for ckpt, _ in jobs for p in ckpt.parts), progress, cancel)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _copy_tree(src, tmp, skip=rewritten)
        for ckpt, plan in jobs:
            tasks, deltas = _tasks(plan, ckpt), _Deltas(ckpt, plan, device)
            for part in ckpt.parts:
                with open(os.path.join(tmp, part.rel), "wb") as fh:
                    _write_part(ckpt, part, tasks, deltas, fh, ticker, result, {})
    return result


def _copy_tree(src: str, dst: str, skip: set[str]) -> None:
    """Copy everything under ``src`` except the relative paths in ``skip`` (folders are created)."""
    for dirpath, _, files in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(dst, rel_dir), exist_ok=True)
        for name in files:
            rel = os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/")
            if rel not in skip:
                shutil.copy2(os.path.join(dirpath, name), os.path.join(dst, rel))


def bake(src: str | os.PathLike, loras: list[BakeLora], out: str | os.PathLike, overwrite: bool = False,
         progress=None, cancel=None, device=None, force: bool = False) -> BakeResult:
    """Bake ``loras`` into the checkpoint ``src`` (single .safetensors file or diffusers folder) → ``out``.
    ``device``: where the deltas are computed (e.g. "cuda"); the sum and cast happen on the CPU.
    ``force``: bake the fitting modules of a LoRA made for another model family (default: none of it,
    with the diagnosis in the warnings). A weight whose baked value is not finite keeps its value."""
    src, out = os.fspath(src), os.fspath(out)
    if not loras:
        raise ToolError("bake needs at least one --lora")
    if os.path.abspath(src) == os.path.abspath(out):
        raise ToolError(f"{out}: output must differ from the input checkpoint")
    if os.path.isdir(src):
        return bake_diffusers(src, loras, out, overwrite, progress, cancel, device, force)
    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(out)
    return bake_single(src, loras, out, progress, cancel, device, force)
