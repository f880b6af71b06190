"""One-screen diagnosis of a LoRA file: format, adapter types, rank/alpha per block,
metadata, the base architecture it was made for, and what could not be interpreted."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from ..errors import LoraEngineError
from ..families import FAMILIES
from ..formats import LoraFile, load_lora
from ..keymap.diagnose import lora_family

ARCH_FROM_BASE_VERSION = {"sd_v1": "sd1", "sd_v2": "sd2", "sd_v2_v": "sd2"}
# Cross-attention context width (attn2 to_k/to_v input) and text-encoder width per architecture.
CONTEXT_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TE_WIDTH = {768: "sd1", 1024: "sd2"}


@dataclass
class Summary:
    path: str
    format: str
    architecture: str  # "sd1" | "sd2" | "sdxl" | a declared DiT family ("flux", "sd3", "flux/sd3") | "other" | "unknown"
    architecture_source: str
    modules: int
    adapter_types: dict[str, int]
    blocks: dict[str, dict]  # block -> {"modules": n, "ranks": [...], "alphas": [...]}
    metadata: dict[str, str]
    unknown_keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _arch_from_metadata(meta: dict[str, str]) -> str | None:
    v = meta.get("ss_base_model_version", "")
    if v in ARCH_FROM_BASE_VERSION:
        return ARCH_FROM_BASE_VERSION[v]
    if v.startswith("sdxl"):
        return "sdxl"
    if v:
        return "other"
    arch = meta.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if arch.startswith("stable-diffusion-v1"):
        return "sd1"
    if arch:
        return "other"
    if meta.get("ss_v2") == "True":
        return "sd2"
    return None


def _in_width(adapter) -> int | None:
    inner = getattr(adapter, "inner", adapter)
    shape = getattr(inner, "natural_shape", None)
    if shape is None:
        return None
    try:
        s = shape()
    except (RuntimeError, ValueError):
        return None
    return int(s[1]) if len(s) > 1 else None


# LoRA family label (keymap.diagnose) -> architecture name, for the declared DiT families
_DIT_LABELS = {f.label: f.name for f in FAMILIES if f.name != "chroma"} | {"Flux.1/SD3": "flux/sd3"}


def _arch_from_keys(lf: LoraFile) -> tuple[str, str]:
    names = list(lf.modules)
    dit = _DIT_LABELS.get(lora_family([n for n in names if n.startswith("lora_unet_")]) or "")
    if dit is not None:
        return dit, "diffusion-transformer key names"
    if any(n.startswith("lora_te2_") for n in names):
        return "sdxl", "second text encoder keys"
    for n, m in lf.modules.items():
        if n.startswith("lora_unet_") and re.search(r"attn2_to_[kv]$", n):
            w = _in_width(m.adapter)
            if w in CONTEXT_WIDTH:
                return CONTEXT_WIDTH[w], f"cross-attention context width {w}"
    for n, m in lf.modules.items():
        if n.startswith(("lora_te_", "lora_te1_")) and re.search(r"(q_proj|k_proj|v_proj|fc1)$", n):
            w = _in_width(m.adapter)
            if w in TE_WIDTH:
                return TE_WIDTH[w], f"text-encoder width {w}"
    if any(re.match(r"lora_unet_(input_blocks_[78]|output_blocks_[6-8]_1)", n) for n in names):
        return "sd1", "ldm block numbering"
    return "unknown", "no metadata, no decisive key or shape"


_DIT_BLOCK = re.compile(r"lora_unet_(double_blocks|single_blocks|joint_blocks|single_transformer_blocks|transformer_blocks)_(\d+)_")


def block_of(name: str) -> str:
    """Group a canonical module name into a block label ("unet down_blocks_1", "te layers 0-11", ...)."""
    m = re.match(r"lora_unet_((?:down|up)_blocks_\d+|mid_block|(?:input|output)_blocks_\d+|middle_block)", name)
    if m:
        return "unet " + m.group(1)
    m = _DIT_BLOCK.match(name)
    if m:
        return f"dit {m.group(1)}_{m.group(2)}"
    if name.startswith("lora_unet_"):
        return "unet other"
    m = re.match(r"lora_(te\d?)_", name)
    if m:
        return m.group(1)
    return "other"


def _blocks(lf: LoraFile) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, m in sorted(lf.modules.items()):
        b = out.setdefault(block_of(name), {"modules": 0, "ranks": set(), "alphas": set()})
        b["modules"] += 1
        inner = getattr(m.adapter, "inner", m.adapter)
        rank = getattr(inner, "rank", None)
        if rank:
            b["ranks"].add(int(rank))
            b["alphas"].add(round(float(inner.scale) * rank, 4))
    return {k: {"modules": v["modules"], "ranks": sorted(v["ranks"]), "alphas": sorted(v["alphas"])} for k, v in out.items()}


def summarize(source: str | os.PathLike | LoraFile, check_finite: bool = True) -> Summary:
    """Diagnose a file. Never raises for a bad file: the error is in ``Summary.error``.
    ``check_finite=False`` reads only headers and scalars (no NaN/Inf scan): for scanning folders."""
    if isinstance(source, LoraFile):
        lf = source
    else:
        try:
            lf = load_lora(source, check_finite=check_finite)
        except LoraEngineError as e:
            return Summary(os.fspath(source), "unreadable", "unknown", "", 0, {}, {}, {}, error=str(e))
    arch = _arch_from_metadata(lf.metadata)
    arch_src = "metadata"
    if arch is None:
        arch, arch_src = _arch_from_keys(lf)
    kinds = Counter()
    for m in lf.modules.values():
        kinds[m.kind if m.kind != "dora" else f"dora({m.adapter.inner.kind})"] += 1
    return Summary(lf.path, lf.format, arch, arch_src, len(lf.modules), dict(kinds), _blocks(lf), dict(lf.metadata),
                   list(lf.unknown_keys), list(lf.problems), list(lf.warnings))


def format_summary(s: Summary) -> str:
    if s.error:  # one line; the error names the file
        return f"error: {s.error}"
    lines = [s.path, f"  format: {s.format}    architecture: {s.architecture} ({s.architecture_source})",
             f"  modules: {s.modules}    types: " + ", ".join(f"{k}×{v}" for k, v in sorted(s.adapter_types.items()))]
    for b, info in s.blocks.items():
        ranks = ",".join(map(str, info["ranks"])) or "-"
        alphas = ",".join(f"{a:g}" for a in info["alphas"]) or "-"
        lines.append(f"    {b:<28} {info['modules']:>4} modules  rank {ranks}  alpha {alphas}")
    keep = [k for k in s.metadata if k.startswith(("ss_output_name", "ss_network", "ss_base_model", "modelspec.title",
                                                    "modelspec.architecture", "ss_sd_model_name", "sshs_model_hash"))]
    for k in keep:
        lines.append(f"  {k}: {s.metadata[k][:100]}")
    if s.unknown_keys:
        lines.append(f"  not understood: {len(s.unknown_keys)} key(s), e.g. {', '.join(s.unknown_keys[:3])}")
    for p in s.problems[:5]:
        lines.append(f"  problem: {p}")
    if len(s.problems) > 5:
        lines.append(f"  ... and {len(s.problems) - 5} more problems")
    for w in s.warnings:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def summary_json(s: Summary) -> str:
    return json.dumps(s.to_json(), indent=2, sort_keys=True)
