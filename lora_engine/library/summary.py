"""One-screen diagnosis of a LoRA file: format, adapter types, rank/alpha per block,
metadata, the base architecture it was made for, and what could not be interpreted.

Without metadata the architecture comes from keys and widths: the cross-attention context width
(attn2 to_k/to_v input: 768 SD1, 1024 SD2, 2048 SDXL), the text encoder's width (768 CLIP-L, 1024
OpenCLIP-H; its MLP 3072 / 4096), a second text encoder or a transformer depth above one (SDXL).
Every adapter type gives the widths its tensors hold (:func:`layer_widths`): LoRA-like factors both,
OFT the output rows, IA3 the axis it scales, GLoRA both. A folder of per-component PEFT folders
(``unet/``, ``text_encoder/``…, as ``convert --to peft`` writes) is read as one LoRA."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from ..errors import LoraEngineError
from ..families import FAMILIES, SD_FAMILIES
from ..families.lora_names import AmbiguousFamily, family_from_names
from ..formats import LoraFile, load_lora
from ..formats.dialect import dialect, file_keys
from ..keymap.diagnose import lora_family

ARCH_FROM_BASE_VERSION = {"sd_v1": "sd1", "sd_v2": "sd2", "sd_v2_v": "sd2"}


def _width_of(kind: str) -> dict[int, str]:
    """The SD families' declared widths of one kind -> family name."""
    return {f.widths[kind]: f.name for f in SD_FAMILIES if kind in f.widths}


# Cross-attention context width (attn2 to_k/to_v input) and text-encoder width per architecture.
CONTEXT_WIDTH = _width_of("context")
TE_WIDTH = _width_of("te")
TE_MLP_WIDTH = _width_of("te_mlp")  # CLIP-L / OpenCLIP-H fc1 output, fc2 input


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
    dialect: str = ""  # the writer's key spelling (formats.dialect): kohya, diffusers/PEFT, ComfyUI-native, XLabs, ...

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


def layer_widths(adapter) -> tuple[int | None, int | None]:
    """``(output, input)`` width of the layer an adapter was made for, as far as its tensors tell."""
    return adapter.layer_widths()


# LoRA family label (keymap.diagnose) -> architecture name, for the declared DiT families
_DIT_LABELS = {f.label: f.name for f in FAMILIES if f.name != "chroma"} | {"Flux.1/SD3": "flux/sd3"}


def _arch_from_keys(lf: LoraFile) -> tuple[str, str]:
    names = list(lf.modules)
    dit = _DIT_LABELS.get(lora_family([n for n in names if n.startswith("lora_unet_")]) or "")
    if dit == "flux/sd3":  # diffusers transformer_blocks names: a layer or text encoder only one family has
        try:
            family = family_from_names(names, {})
        except AmbiguousFamily:
            family = None
        dit = family.name if family is not None else dit
    if dit is not None:
        return dit, "diffusion-transformer key names"
    if any(n.startswith("lora_te2_") for n in names):
        return "sdxl", "second text encoder keys"
    widths = {n: layer_widths(m.adapter) for n, m in lf.modules.items()}
    for n, (_, w) in widths.items():
        if n.startswith("lora_unet_") and re.search(r"attn2_to_[kv]$", n) and w in CONTEXT_WIDTH:
            return CONTEXT_WIDTH[w], f"cross-attention context width {w}"
    for n, (o, i) in widths.items():
        layer = re.search(r"_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$", n)
        if not (layer and n.startswith(("lora_te_", "lora_te1_"))):
            continue
        hidden, mlp = {"fc1": ((i,), o), "fc2": ((o,), i)}.get(layer.group(1), ((o, i), None))
        for w in hidden:
            if w in TE_WIDTH:
                return TE_WIDTH[w], f"text-encoder width {w}"
        if mlp in TE_MLP_WIDTH:
            return TE_MLP_WIDTH[mlp], f"text-encoder MLP width {mlp}"
    if any(n.startswith("lora_unet_") and re.search(r"transformer_blocks_[1-9]", n) for n in names):
        return "sdxl", "transformer depth above one (SDXL UNet layout)"
    if any(re.match(r"lora_unet_(input_blocks_[78]|output_blocks_[6-8]_1)", n) for n in names):
        return "sd1", "ldm block numbering"
    if any(re.match(r"lora_unet_(down_blocks_0|up_blocks_3)_attentions", n) for n in names):
        return "unknown", "SD1/SD2 UNet layout; no width that tells the two apart"
    return "unknown", "no metadata, no decisive key or shape"


def lora_architecture(lf: LoraFile) -> tuple[str, str]:
    """(``"sd1"`` | ``"sd2"`` | ``"sdxl"`` | ``"other"`` | ``"unknown"``, what says so) for a LoRA file:
    its training metadata, else its key names and layer widths."""
    arch = _arch_from_metadata(lf.metadata)
    if arch is not None:
        return arch, "metadata"
    return _arch_from_keys(lf)


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
        rank = m.adapter.rank
        if rank:
            b["ranks"].add(int(rank))
            b["alphas"].add(round(float(m.adapter.scale) * rank, 4))
    return {k: {"modules": v["modules"], "ranks": sorted(v["ranks"]), "alphas": sorted(v["alphas"])} for k, v in out.items()}


def summarize(source: str | os.PathLike | LoraFile, check_finite: bool = True) -> Summary:
    """Diagnose a file. Never raises for a bad file: the error is in ``Summary.error``.
    ``check_finite=False`` reads only headers and scalars (no NaN/Inf scan): for scanning folders.

    Every malformed file is a :class:`LoraEngineError` from the loader; anything else escaping it would be a
    bug, and is still reported here (with its type) rather than raised, so a folder scan always finishes."""
    try:
        return _summarize(source, check_finite)
    except LoraEngineError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - the contract above: one bad file never stops a caller
        where = source.path if isinstance(source, LoraFile) else os.fspath(source)
        error = f"{where}: internal error reading it ({type(e).__name__}: {str(e)[:160]})"
    path = source.path if isinstance(source, LoraFile) else os.fspath(source)
    return Summary(path, "unreadable", "unknown", "", 0, {}, {}, {}, error=error.replace("\n", " "))


def _summarize(source: str | os.PathLike | LoraFile, check_finite: bool) -> Summary:
    lf = source if isinstance(source, LoraFile) else load_lora(os.fspath(source), check_finite)
    arch, arch_src = lora_architecture(lf)
    kinds = Counter()
    for m in lf.modules.values():
        kinds[m.adapter.label] += 1
    return Summary(lf.path, lf.format, arch, arch_src, len(lf.modules), dict(kinds), _blocks(lf), dict(lf.metadata),
                   list(lf.unknown_keys), list(lf.problems), list(lf.warnings), dialect=_dialect_of(lf))


def _dialect_of(lf: LoraFile) -> str:
    if lf.format == "peft" and os.path.isdir(lf.path):
        return "PEFT"
    try:
        return dialect(file_keys(lf.path), lf.format)
    except (LoraEngineError, OSError):  # a LoraFile built in memory, or a file gone since
        return lf.format


def format_summary(s: Summary) -> str:
    if s.error:  # one line; the error names the file
        return f"error: {s.error}"
    lines = [s.path, f"  format: {s.format}    dialect: {s.dialect or s.format}    architecture: {s.architecture} "
             f"({s.architecture_source})",
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
