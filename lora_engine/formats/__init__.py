"""Read any LoRA file people have into one representation: :class:`LoraFile`.

``load_lora(path)`` accepts kohya/LyCORIS safetensors, diffusers (PEFT-era and the old
attention-processor form), PEFT folders, ComfyUI-native keys, and legacy pickles (through
``torch.load(weights_only=True)`` only). Every key is either consumed into a module's
adapter or listed in ``LoraFile.unknown_keys``; modules whose tensors do not make sense
are listed in ``LoraFile.problems`` with a one-line reason.

Every malformed input ends in one :class:`LoraFileError` (or a subclass) whose message is one
line naming the file and the problem; nothing else escapes. The checks:

- the path exists; a folder is a PEFT folder (``adapter_model.safetensors``/``.bin``);
- a safetensors file passes every header check of :mod:`.safetensors_file` (listed there);
- a pickle (``.pt``, ``.ckpt``, ``.bin``, ``.pth``) is not empty, loads with
  ``torch.load(weights_only=True)`` (one that would call code is :class:`UnsafeFileError`),
  holds a dict of tensors (or ``{"state_dict": ...}``), and every tensor is dense, real-valued
  and of a dtype a safetensors file could hold (:mod:`.legacy`);
- a PEFT folder's ``adapter_config.json`` is at most 4 MB of UTF-8 JSON, an object, with
  ``lora_alpha``/``alpha`` finite numbers and ``alpha_pattern`` an object of regular
  expressions to finite numbers (:mod:`.peft_folder`); a diffusers ``lora_adapter_metadata``
  entry that fails the same checks is ignored with a warning (alpha = rank);
- the file holds at least one tensor;
- per module (a problem in ``LoraFile.problems``, the module skipped; the file is refused
  with :class:`AdapterShapeError` only when no module is left): NaN/Inf in its tensors (unless
  ``check_finite=False``); ``alpha``/``scale``/``on_input`` of exactly one element; factors
  (``down``, ``up``, ``mid``, ``hada_*``, ``lokr_*``, GLoRA's ``a1``..``b2``) with at least two
  dimensions, every other tensor with at least one; OFT blocks of 3 or 4 dimensions; factors
  that chain (LoRA up/down/mid, LoHa, LoKr); a complete set of tensors for its adapter type;
  any other error while building the adapter (:func:`lora_engine.adapters.build_adapter`);
- at least one key is a known adapter tensor ("not a LoRA" otherwise).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch

from ..adapters import AlphaSpec, build_adapter
from ..adapters.base import Adapter
from ..errors import AdapterShapeError, LoraFileError
from ..finite import nonfinite as _nonfinite
from .keys import ModuleKey, parse_key, te_prefix_for
from .kohya_split import split_qkv_note
from .legacy import read_pickled
from .peft_folder import (PeftAlpha, component_folders, component_name, diffusers_metadata_configs, folder_config,
                          folder_weights, is_peft_folder)
from .safetensors_file import SafetensorsFile

log = logging.getLogger("lora_engine")

PICKLE_EXTS = (".pt", ".ckpt", ".bin", ".pth")


@dataclass(frozen=True)
class ModuleAdapter:
    """One target module of a LoRA file: canonical name, dotted path when known, the adapter."""

    name: str
    dotted: str | None
    adapter: Adapter

    @property
    def kind(self) -> str:
        return self.adapter.kind


@dataclass
class LoraFile:
    path: str
    format: str
    metadata: dict[str, str]
    modules: dict[str, ModuleAdapter]
    unknown_keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    peft_config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # facts for the user whenever the file is applied

    @property
    def name(self) -> str:
        base = os.path.basename(self.path.rstrip("/\\"))
        return os.path.splitext(base)[0] if os.path.isfile(self.path) else base

    def nbytes(self) -> int:
        total = 0
        for m in self.modules.values():
            for t in _tensors_of(m.adapter):
                total += t.numel() * t.element_size()
        return total


def _tensors_of(adapter) -> list[torch.Tensor]:
    out = []
    for v in vars(adapter).values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif hasattr(v, "__dataclass_fields__"):
            out.extend(_tensors_of(v))
    return out


def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """Container level: ``(tensors, metadata, peft_config)`` for a file or PEFT folder."""
    if os.path.isdir(path):
        if not is_peft_folder(path):
            raise LoraFileError(path, "folder is not a PEFT adapter (no adapter_model.safetensors)")
        weights = folder_weights(path)
        tensors, meta, _ = read_tensors(weights)
        return tensors, meta, folder_config(path)
    if not os.path.exists(path):
        raise LoraFileError(path, "no such file")
    if path.lower().endswith(PICKLE_EXTS):
        tensors, meta = read_pickled(path)
        return tensors, meta, {}
    f = SafetensorsFile(path)
    return f.tensors(), f.metadata, {}


def _detect_format(keys: list[str], roles: set[str], peft_config: dict) -> str:
    if peft_config:
        return "peft"
    lyco = {"hada_w1_a", "lokr_w1", "lokr_w1_a", "on_input", "a1", "diff", "w_norm", "oft_blocks", "oft_diag", "mid"}
    if any(k.startswith(("lora_unet_", "lora_te", "oft_unet_", "lycoris_")) for k in keys):
        return "lycoris" if roles & lyco else "kohya"
    if any(".processor.qkv_lora" in k or ".processor.proj_lora" in k for k in keys):
        return "xlabs"
    if any(".processor." in k or "_lora.down." in k or "_lora.up." in k for k in keys):
        return "diffusers-old"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.", "transformer.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "comfyui"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    return "unknown"


def lora_from_tensors(
    path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], peft_config: dict | None = None,
    check_finite: bool = True,
) -> LoraFile:
    """Group keys by module, pick each module's adapter, and account for every key.

    ``check_finite=False`` skips the NaN/Inf scan, the only step that reads every tensor's bytes
    (for header-level summaries of whole folders)."""
    peft_config = peft_config or {}
    te_prefix = te_prefix_for(tensors)
    grouped: dict[ModuleKey, dict[str, torch.Tensor]] = {}
    raw_keys: dict[ModuleKey, list[str]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        parsed = parse_key(key, te_prefix)
        if parsed is None:
            unknown.append(key)
            continue
        mk, role = parsed
        grouped.setdefault(mk, {})[role] = t
        raw_keys.setdefault(mk, []).append(key)

    all_roles = {r for g in grouped.values() for r in g}
    fmt = _detect_format(list(tensors), all_roles, peft_config)
    comp_cfgs = diffusers_metadata_configs(metadata)
    lf = LoraFile(path, fmt, metadata, {}, unknown, peft_config=peft_config)
    if not comp_cfgs and str(metadata.get("lora_adapter_metadata") or "").strip() not in ("", "{}"):
        lf.warnings.append(f"{path}: lora_adapter_metadata is not a usable LoRA config; alpha = rank assumed")

    nonfinite = [k for k, t in tensors.items() if _nonfinite(t)] if check_finite else []
    if nonfinite:
        lf.warnings.append(
            f"{path}: {len(nonfinite)} tensor(s) contain NaN/Inf (first: {nonfinite[0]}); those modules are skipped"
        )
    bad = set(nonfinite)

    for mk, roles in grouped.items():
        keys = raw_keys[mk]
        if bad.intersection(keys):
            lf.problems.append(f"{mk.name}: NaN/Inf in its tensors")
            continue
        if "weight" in roles and "on_input" not in roles:  # a bare ".weight" is not an adapter tensor
            unknown.extend(k for k in keys if k.endswith(".weight") and parse_key(k, te_prefix)[1] == "weight")
            roles = {r: t for r, t in roles.items() if r != "weight"}
            if not roles:
                continue
        if set(roles) == {"scale"} and roles["scale"].numel() > 1:
            # a whole norm tensor under its own name (BFL control LoRAs' ``…query_norm.scale``): it replaces
            # the layer's weight, as ComfyUI's ``set_weight`` and diffusers' control-LoRA norms do
            roles = {"set_weight": roles["scale"]}
        ext = _alpha_for(mk, peft_config, comp_cfgs)
        peft_style = any(k.endswith(("lora_magnitude_vector", "lora_magnitude_vector.weight")) for k in keys)
        try:
            adapter, left = build_adapter(roles, ext, dora_axis=0 if peft_style else None)
        except ValueError as e:
            lf.problems.append(f"{mk.name}: {e}")
            continue
        for role in left:
            unknown.extend(k for k in keys if parse_key(k, te_prefix)[1] == role)
        lf.modules[mk.name] = ModuleAdapter(mk.name, mk.dotted, adapter)

    if (note := split_qkv_note(lf.modules, metadata)) is not None:
        lf.notes.append(note)
    if not lf.modules:
        if lf.problems:
            raise AdapterShapeError(path, f"no usable module: {lf.problems[0]}" +
                                    (f" (and {len(lf.problems) - 1} more)" if len(lf.problems) > 1 else ""))
        sample = ", ".join(unknown[:3])
        raise LoraFileError(path, f"not a LoRA: none of its {len(tensors)} keys is a known adapter tensor"
                            + (f" (e.g. {sample})" if sample else ""))
    return lf


def _alpha_for(mk: ModuleKey, peft_config: dict, comp_cfgs: dict[str, dict]) -> AlphaSpec:
    if peft_config:
        return PeftAlpha(peft_config).for_module(mk.dotted)
    if comp_cfgs:
        comp = "unet"
        if mk.name.startswith("lora_te2_"):
            comp = "text_encoder_2"
        elif mk.name.startswith("lora_te3_"):
            comp = "text_encoder_3"
        elif mk.name.startswith(("lora_te_", "lora_te1_")):
            comp = "text_encoder"
        cfg = comp_cfgs.get(comp) or comp_cfgs.get("transformer") or comp_cfgs.get("")
        if cfg:
            return PeftAlpha(cfg).for_module(mk.dotted)
    return AlphaSpec()


def load_lora(path: str | os.PathLike, check_finite: bool = True) -> LoraFile:
    """Read and interpret one LoRA file, PEFT folder, or folder of per-component PEFT folders (as
    ``convert --to peft`` writes a LoRA on several models). Raises :class:`LoraFileError` subclasses."""
    path = os.fspath(path)
    if component_folders(path):
        return _load_components(path, check_finite)
    tensors, metadata, peft_config = read_tensors(path)
    if not tensors:
        raise LoraFileError(path, "file holds no tensors")
    lf = lora_from_tensors(path, tensors, metadata, peft_config, check_finite=check_finite)
    for w in lf.warnings:
        log.warning(w)
    return lf


def _load_components(path: str, check_finite: bool) -> LoraFile:
    """A folder of per-component PEFT folders read as one LoRA: module names as in a kohya file of the
    whole LoRA; keys, problems and warnings prefixed by their component."""
    parts = component_folders(path)
    sdxl = any(c == "text_encoder_2" for _, c in parts)
    whole = LoraFile(path, "peft", {}, {})
    for sub, comp in parts:
        lf = load_lora(sub, check_finite=check_finite)
        for name, m in lf.modules.items():
            new = component_name(name, comp, sdxl)
            whole.modules[new] = replace(m, name=new)
        whole.metadata.update(lf.metadata)
        whole.unknown_keys += [f"{comp}/{k}" for k in lf.unknown_keys]
        whole.problems += [f"{comp}: {p}" for p in lf.problems]
        whole.warnings += lf.warnings
    return whole
