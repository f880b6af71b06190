"""Convert between kohya/LyCORIS safetensors and PEFT folders / diffusers files.

kohya ↔ PEFT for LoRA modules is a renaming: ``lora_down`` = ``lora_A``, ``lora_up`` = ``lora_B``
(same tensors, same bytes), α moves between the ``.alpha`` tensor and the LoraConfig (``r``,
``lora_alpha``, ``rank_pattern``, ``alpha_pattern``); a DoRA magnitude moves between ``dora_scale``
(o, 1[, 1, 1]) and ``lora_magnitude_vector`` ((o,) / (1, o, 1, 1)). α is taken from where the source
keeps it (the ``.alpha`` tensor itself, or the PEFT/diffusers config), never recomputed from s = α/r,
so kohya → PEFT → kohya is bit-exact. An rsLoRA config (s = α/√r) becomes kohya α = lora_alpha·√r.

Module paths for PEFT/diffusers (``down_blocks.0.attentions.0.proj_in``) come from the file when it
spelled them, else from a reference model (``reference``: {param key: shape} of a diffusers-named
pipeline or model, or a diffusers folder), else from kohya's rule read backwards with a table of the
multi-word names diffusers UNets and HF CLIP text models use (``dotted_name``). LyCORIS modules (LoHa,
LoKr, IA3, …) have no PEFT LoRA form; converting to kohya keeps their tensors unchanged.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..errors import ToolError
from ..formats import LoraFile, load_lora, read_tensors
from ..formats.keys import SUFFIX_ROLES, parse_key, te_prefix_for
from ..formats.peft_folder import PeftAlpha, component_folders, component_name, diffusers_metadata_configs
from ..formats.writer import LoraTensors, write_diffusers, write_kohya, write_peft_folder
from .naming import titled
from .progress import Ticker

COMPONENT_OF = (("lora_unet_", "unet"), ("lora_te3_", "text_encoder_3"), ("lora_te2_", "text_encoder_2"),
                ("lora_te1_", "text_encoder"),
                ("lora_te_", "text_encoder"))
# Multi-word module names of diffusers UNets, HF CLIP and T5 text models (kohya's "_" rule is lossy for them).
WORDS = ("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
         "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding",
         "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
         "out_proj", "text_projection", "conv_norm_out", "final_layer_norm", "layer_norm1", "layer_norm2",
         "wi_0", "wi_1")
_WORD_PARTS = sorted((tuple(w.split("_")) for w in WORDS), key=len, reverse=True)
_ROLE_SUFFIX = {}
for _suffix, _role in SUFFIX_ROLES.items():
    _ROLE_SUFFIX.setdefault(_role, _suffix)  # the table lists kohya/LyCORIS spellings first


@dataclass
class ConvertResult:
    out: str
    modules: int = 0
    kept_as_is: int = 0  # LyCORIS modules passed through (kohya output)
    warnings: list[str] = field(default_factory=list)


def component_of(name: str) -> tuple[str, str]:
    for prefix, comp in COMPONENT_OF:
        if name.startswith(prefix):
            return comp, name[len(prefix):]
    raise ToolError(f"{name}: not a UNet or text-encoder module name")


def dotted_name(name: str) -> tuple[str, str]:
    """(component, dotted path) by kohya's rule read backwards: "_" → "." except inside known words."""
    comp, rest = component_of(name)
    parts, out, i = rest.split("_"), [], 0
    while i < len(parts):
        for word in _WORD_PARTS:
            if tuple(parts[i:i + len(word)]) == word:
                out.append("_".join(word))
                i += len(word)
                break
        else:
            out.append(parts[i])
            i += 1
    return comp, ".".join(out)


def reference_paths(named_shapes) -> dict[str, tuple[str, str]]:
    """{canonical name: (component, dotted path)} from a diffusers-named reference (``unet.*``, ``text_encoder*.*``)."""
    from ..keymap import build_keymap

    keymap = build_keymap(named_shapes)
    out = {}
    for name in keymap.names():
        t = keymap.lookup(name)
        comp, _, path = t.weight_key.partition(".")
        if t.rows is None and comp in ("unet", "text_encoder", "text_encoder_2") and path.endswith(".weight"):
            out[name] = (comp, path[: -len(".weight")])
    return out


def _alpha(lf: LoraFile, name: str, ma, raw: dict[str, torch.Tensor], rank: int):
    """α as the source stores it: the raw ``.alpha`` tensor, else from the PEFT/diffusers config, else r."""
    if f"{name}.alpha" in raw:
        return raw[f"{name}.alpha"]
    cfg = lf.peft_config or None
    if cfg is None:
        comps = diffusers_metadata_configs(lf.metadata)
        comp = component_of(name)[0]
        cfg = comps.get(comp) or (comps.get("transformer") if comp == "unet" else None) or comps.get("")
    if cfg:
        spec = PeftAlpha(cfg).for_module(ma.dotted)
        if spec.alpha is not None:
            return spec.alpha * math.sqrt(rank) if spec.rslora else spec.alpha
    return float(rank)


def _kohya_magnitude(mag: torch.Tensor, up: torch.Tensor, peft: bool) -> torch.Tensor:
    if not peft:
        return mag  # kohya/LyCORIS dora_scale: keep its bytes and layout
    return mag.reshape(up.shape[0], *([1] * (up.ndim - 1)))


def lora_modules(lf: LoraFile) -> tuple[dict[str, LoraTensors], list[str]]:
    """LoRA(+DoRA) modules as :class:`LoraTensors` with their stored tensors; names of other modules."""
    raw, _, _ = read_tensors(lf.path)
    raw_by_name = _raw_by_module(raw)
    peft_style = lf.format in ("peft", "diffusers")
    modules, others = {}, []
    for name, ma in lf.modules.items():
        a = ma.adapter.inner if ma.adapter.kind == "dora" else ma.adapter
        if a.kind != "lora":
            others.append(name)
            continue
        if a.up_bias is not None:
            raise ToolError(f"{lf.path}: {name} has a lora_B bias (PEFT lora_bias); kohya files cannot store it")
        mag = ma.adapter.magnitude if ma.adapter.kind == "dora" else None
        modules[name] = LoraTensors(a.down, a.up, _alpha(lf, name, ma, raw_by_name.get(name, {}), a.rank), a.mid,
                                    None if mag is None else _kohya_magnitude(mag, a.up, peft_style))
    return modules, others


def _raw_by_module(raw: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{canonical name: {"<name>.<kohya suffix>": tensor}} of a file's raw keys."""
    te = te_prefix_for(raw)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        parsed = parse_key(key, te)
        if parsed is not None:
            mk, role = parsed
            out.setdefault(mk.name, {})[f"{mk.name}.{_ROLE_SUFFIX[role]}"] = t
    return out


def _sources(src: str) -> list[tuple[LoraFile, str]]:
    """[(file, component)] -- one file, or each component sub-folder of a multi-component PEFT folder."""
    return [(load_lora(sub), c) for sub, c in component_folders(src)] or [(load_lora(src), "")]


@dataclass
class _Collected:
    modules: dict = field(default_factory=dict)  # name -> LoraTensors
    dotted: dict = field(default_factory=dict)  # name -> dotted path from the file, when it had one
    passthrough: dict = field(default_factory=dict)  # kohya key -> tensor (LyCORIS modules)
    others: list = field(default_factory=list)  # (file, name, kind) of non-LoRA modules
    metadata: dict = field(default_factory=dict)


def _collect(src: str) -> _Collected:
    sources = _sources(src)
    sdxl = any(c == "text_encoder_2" for _, c in sources)
    got = _Collected()
    for lf, comp in sources:
        modules, others = lora_modules(lf)
        for name, m in modules.items():
            got.modules[component_name(name, comp, sdxl)] = m
            if lf.modules[name].dotted is not None:
                got.dotted[component_name(name, comp, sdxl)] = lf.modules[name].dotted
        got.others += [(lf, name, lf.modules[name].kind) for name in others]
        if others and not lf.peft_config:
            raw = _raw_by_module(read_tensors(lf.path)[0])
            got.passthrough.update({k: t for name in others for k, t in raw[name].items()})
        got.metadata.update({k: v for k, v in lf.metadata.items() if k.startswith(("ss_", "modelspec."))})
    return got


def _paths(got: _Collected, reference) -> dict[str, tuple[str, str]]:
    ref = reference_paths(reference) if reference is not None else {}
    out = {}
    for name in got.modules:
        alias = name.replace("lora_te1_", "lora_te_")
        if name in got.dotted:
            out[name] = (component_of(name)[0], got.dotted[name])
        elif name in ref or alias in ref:
            out[name] = ref.get(name) or ref[alias]
        elif name.startswith("lora_unet_") and name[10:].startswith(("input_blocks", "middle_block", "output_blocks")):
            raise ToolError(f"{name} uses sgm block names; give a diffusers reference model to map it")
        else:
            out[name] = dotted_name(name)
    return out


def convert(src: str | os.PathLike, out: str | os.PathLike, to: str, reference=None, overwrite: bool = False,
            progress=None, cancel=None) -> ConvertResult:
    """``to``: ``kohya`` (safetensors), ``peft`` (folder; one sub-folder per component when the LoRA has
    several), ``diffusers`` (one safetensors file). ``src`` may also be such a multi-component PEFT
    folder. ``reference``: {param key: shape} of a diffusers-named model, or a diffusers folder."""
    src, out = os.fspath(src), os.fspath(out)
    ticker = Ticker(1, progress, cancel)
    got = _collect(src)
    if isinstance(reference, (str, os.PathLike)):
        from ..formats.checkpoint import open_checkpoint
        reference = open_checkpoint(reference).shapes()
    dit = _dit_layout(got, reference)
    if dit is not None:
        res = _to_dit(got, out, to, *dit)
    elif to == "comfyui":
        raise ToolError("--to comfyui is for Flux.1/Chroma/SD3 LoRAs (ComfyUI reads SD kohya files as they are)")
    elif to == "kohya":
        res = _to_kohya(got, out)
    elif to in ("peft", "diffusers"):
        res = _to_peft(got, out, to, reference, overwrite)
    else:
        raise ToolError(f"unknown target format {to!r} (kohya, peft, diffusers, comfyui)")
    ticker.tick(os.path.basename(out))
    return res


def _dit_layout(got: _Collected, reference):
    """(family, row-layout config) when the LoRA is for Flux.1/Chroma/SD3 (told by the reference model
    when given, else by its names), else None."""
    from ..families.lora_names import AmbiguousFamily, family_from_names
    from ..keymap.roots import find_roots
    from .convert_dit import config_from_lora, config_from_reference

    if reference is not None:
        root, _ = find_roots(reference)
        return config_from_reference(reference) if root is not None and root.family else None
    try:
        family = family_from_names(list(got.modules) + [n for _, n, _ in got.others], got.metadata)
    except AmbiguousFamily as e:
        raise ToolError(f"{e}; give --reference MODEL") from None
    return None if family is None else (family, config_from_lora(family, got.modules))


def _to_dit(got: _Collected, out: str, to: str, family, cfg) -> ConvertResult:
    from .convert_dit import DIALECTS, convert_modules

    if to not in DIALECTS:
        raise ToolError(f"{family.label} LoRAs convert to {', '.join(DIALECTS)} (not {to!r})")
    if got.others:
        lf, name, kind = got.others[0]
        raise ToolError(f"{lf.path}: {len(got.others)} non-LoRA module(s) (e.g. {name}, {kind}) are not converted "
                        f"between {family.label} dialects, only LoRA")
    conv = convert_modules(family, cfg, got.modules, got.dotted, to)
    meta = titled(got.metadata, out) if got.metadata else {}
    if to == "diffusers":
        write_diffusers(out, conv.tensors, meta)
    else:  # ss_network_dim/alpha are recomputed (a stacked module's rank grew)
        kept = {k: v for k, v in got.metadata.items() if k not in ("ss_network_dim", "ss_network_alpha")}
        write_kohya(out, conv.tensors, titled(kept, out))
    return ConvertResult(out, conv.modules, warnings=conv.notes)


def _to_kohya(got: _Collected, out: str) -> ConvertResult:
    from ..formats.writer import kohya_state_dict, network_metadata

    peft_other = [(lf, n, k) for lf, n, k in got.others if lf.peft_config]
    if peft_other:
        lf, name, kind = peft_other[0]
        raise ToolError(f"{lf.path}: PEFT {kind} modules (e.g. {name}) are not converted, only LoRA")
    tensors = kohya_state_dict(got.modules) | got.passthrough
    meta = (network_metadata(got.modules) if got.modules else {}) | got.metadata
    write_kohya(out, tensors, titled(meta, out))
    return ConvertResult(out, len(got.modules) + len(got.others), kept_as_is=len(got.others))


def _to_peft(got: _Collected, out: str, to: str, reference, overwrite: bool) -> ConvertResult:
    if got.others:
        lf, name, kind = got.others[0]
        raise ToolError(f"{lf.path}: {len(got.others)} non-LoRA module(s) (e.g. {name}, {kind}) have no PEFT "
                        "LoRA form; convert to kohya instead")
    paths = _paths(got, reference)
    comps: dict[str, dict[str, LoraTensors]] = {}
    for name, m in got.modules.items():
        comp, dotted = paths[name]
        comps.setdefault(comp, {})[dotted] = m
    meta = titled(got.metadata, out) if got.metadata else {}  # the source's ss_*/modelspec keys, our own title
    if to == "diffusers":
        write_diffusers(out, comps, meta)
    elif len(comps) == 1:
        write_peft_folder(out, next(iter(comps.values())), overwrite, meta)
    else:
        from ..formats.safetensors_writer import atomic_dir
        with atomic_dir(out, overwrite) as tmp:
            for comp, mods in comps.items():
                write_peft_folder(os.path.join(tmp, comp), mods, metadata=meta)
    return ConvertResult(out, len(got.modules))
