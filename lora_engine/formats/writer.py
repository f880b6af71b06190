"""Write LoRAs: kohya safetensors (with sd-scripts metadata and hashes), PEFT folders, diffusers files.

A module to write is a :class:`LoraTensors`: ``down`` (r, i[, k, k]), ``up`` (o, r[, 1, 1]), α
(so that s = α/r) and optional ``mid`` (Tucker), ``dora_scale`` and ``extra`` tensors keyed by
kohya suffix (LyCORIS tensors passed through unchanged by ``convert``).

kohya keys: ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha`` (0-d, in the
down tensor's dtype), ``<name>.lora_mid.weight``, ``<name>.dora_scale``, ``<name>.<suffix>``.

Hashes as sd-scripts' ``library/train_util.py`` ``precalculate_safetensors_hashes`` computes them:
the tensors are serialised with only the ``ss_*`` metadata; ``sshs_model_hash`` = sha256 of that
serialisation's data region (= the addnet hash of the file we then write, whose data region is
identical), ``sshs_legacy_hash`` = first 8 hex of sha256 of its bytes [0x100000, 0x110000).

PEFT/diffusers: ``lora_A`` = down, ``lora_B`` = up, ``lora_magnitude_vector`` = DoRA magnitude
(per output row: (o,) for Linear, (1, o, 1, 1) for Conv2d); α/r per module in the LoraConfig
(global ``r``/``lora_alpha`` = the most common, ``rank_pattern``/``alpha_pattern`` for the rest).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..errors import ToolError
from ..library.hashes import hash_file
from .safetensors_writer import atomic_dir, atomic_file, write_safetensors

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraTensors:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | torch.Tensor  # a 0-d tensor is written as is (lossless conversion)
    mid: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    # pieces stacked along the rank with α = s·Σr (block-diagonal up, exact): listed in the file's
    # STACKED_KEY metadata so readers do not take it for a kohya ``split_qkv`` module (unscaled α)
    stacked: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class BuiltLora:
    """A LoRA a tool made (merge, extract): its modules, one report per module (the tool's report type),
    warnings, and the metadata to write with it."""

    modules: dict[str, LoraTensors]
    reports: list = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def alpha_tensor(alpha, like: torch.Tensor) -> torch.Tensor:
    if isinstance(alpha, torch.Tensor):
        return alpha.reshape(())
    return torch.tensor(float(alpha), dtype=like.dtype if like.is_floating_point() else torch.float32)


def kohya_state_dict(modules: dict[str, LoraTensors]) -> dict[str, torch.Tensor]:
    """{kohya key: tensor} for modules keyed by canonical (kohya) name."""
    out: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        out[f"{name}.lora_down.weight"] = m.down.contiguous()
        out[f"{name}.lora_up.weight"] = m.up.contiguous()
        out[f"{name}.alpha"] = alpha_tensor(m.alpha, m.down)
        if m.mid is not None:
            out[f"{name}.lora_mid.weight"] = m.mid.contiguous()
        if m.dora_scale is not None:
            out[f"{name}.dora_scale"] = m.dora_scale.contiguous()
        for suffix, t in m.extra.items():
            out[f"{name}.{suffix}"] = t.contiguous()
    return out


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def network_metadata(modules: dict[str, LoraTensors]) -> dict[str, str]:
    """``ss_network_dim``/``ss_network_alpha`` ("Dynamic" when modules differ, as resize_lora.py writes)."""
    ranks = {m.rank for m in modules.values()}
    alphas = {float(m.alpha) for m in modules.values()}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _fmt_number(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": _fmt_number(alphas.pop()) if len(alphas) == 1 else "Dynamic",
    }


def sshs_hashes(tmp_path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of ``tensors`` serialised with only ``ss_*`` metadata
    (written to ``tmp_path`` and hashed by :func:`lora_engine.library.hashes.hash_file`)."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    write_safetensors(tmp_path, tensors, ss_only)
    try:
        h = hash_file(tmp_path)
    finally:
        os.unlink(tmp_path)
    return h.addnet, h.legacy


STACKED_KEY = "lora_engine_stacked_modules"  # JSON list of module names written by ``combine`` (exact α)


def write_kohya(path: str | os.PathLike, modules: dict[str, LoraTensors] | dict[str, torch.Tensor],
                metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Write a kohya/LyCORIS safetensors file atomically; returns the metadata written.

    ``modules``: {name: LoraTensors} or an already-built {key: tensor} dict. Given metadata is kept
    (stale ``sshs_*`` values replaced); ``ss_network_dim/alpha`` are filled in when missing.
    """
    path = os.fspath(path)
    if modules and isinstance(next(iter(modules.values())), LoraTensors):
        meta = network_metadata(modules) | dict(metadata or {})
        tensors = kohya_state_dict(modules)
    else:
        meta, tensors = dict(metadata or {}), dict(modules)
    if not tensors:
        raise ToolError(f"{path}: nothing to write (no modules)")
    meta = {k: v for k, v in meta.items() if not k.startswith("sshs_") and k != STACKED_KEY}
    stacked = sorted(n for n, m in modules.items() if isinstance(m, LoraTensors) and m.stacked)
    if stacked:
        meta[STACKED_KEY] = json.dumps(stacked)
    scratch = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.hash.safetensors")
    model_hash, legacy_hash = sshs_hashes(scratch, tensors, meta)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hash, legacy_hash
    write_safetensors(path, tensors, meta)
    return meta


# ---------------------------------------------------------------- PEFT / diffusers


def _peft_magnitude(m: LoraTensors, dotted: str) -> torch.Tensor:
    mag = m.dora_scale
    o = m.up.shape[0]
    if not (mag.ndim >= 1 and mag.shape[0] == o and mag.numel() == o):
        raise ToolError(f"{dotted}: DoRA magnitude {list(mag.shape)} is per input column; PEFT stores only "
                        "per-output-row magnitudes, so it cannot be converted without loss")
    return mag.reshape(1, o, 1, 1) if m.down.ndim == 4 else mag.reshape(o)


def peft_tensors(modules: dict[str, LoraTensors], prefix: str) -> dict[str, torch.Tensor]:
    """PEFT keys ``<prefix><dotted>.lora_A.weight`` / ``.lora_B.weight`` / ``.lora_magnitude_vector``."""
    out = {}
    for dotted, m in modules.items():
        if m.mid is not None or m.extra:
            kinds = "Tucker lora_mid" if m.mid is not None else ", ".join(sorted(m.extra))
            raise ToolError(f"{dotted}: {kinds} has no PEFT LoRA equivalent; keep the kohya file or resize it first")
        out[f"{prefix}{dotted}.lora_A.weight"] = m.down.contiguous()
        out[f"{prefix}{dotted}.lora_B.weight"] = m.up.contiguous()
        if m.dora_scale is not None:
            out[f"{prefix}{dotted}.lora_magnitude_vector"] = _peft_magnitude(m, dotted).contiguous()
    return out


def _most_common(values: list):
    return Counter(values).most_common(1)[0][0]


def peft_config(modules: dict[str, LoraTensors]) -> dict:
    """A LoraConfig dict reproducing every module's r and α (patterns are full dotted paths)."""
    if not modules:
        raise ToolError("no modules to write")
    doras = {m.dora_scale is not None for m in modules.values()}
    if len(doras) > 1:
        raise ToolError("PEFT needs DoRA on all modules or none; this LoRA mixes them")
    ranks = {d: m.rank for d, m in modules.items()}
    alphas = {d: float(m.alpha) for d, m in modules.items()}
    r, a = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r, "lora_alpha": a, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": doras.pop(), "init_lora_weights": True,
        "target_modules": sorted(modules),
        "rank_pattern": {d: v for d, v in ranks.items() if v != r},
        "alpha_pattern": {d: v for d, v in alphas.items() if v != a},
    }


def write_peft_folder(folder: str | os.PathLike, modules: dict[str, LoraTensors], overwrite: bool = False,
                      metadata: dict[str, str] | None = None) -> dict:
    """A PEFT adapter folder (``PeftModel.from_pretrained`` loads it); modules keyed by dotted path
    inside the target model. Written atomically as a folder. Returns the config. ``metadata`` (e.g. the
    source's ``ss_*`` keys) goes into the weights file's header beside PEFT's ``format``."""
    cfg = peft_config(modules)
    meta = dict(metadata or {}) | {"format": "pt"}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        write_safetensors(os.path.join(tmp, PEFT_WEIGHTS), peft_tensors(modules, "base_model.model."), meta)
        with open(os.path.join(tmp, PEFT_CONFIG), "w", encoding="utf-8") as fh:
            json.dump(cfg, fh, indent=2, sort_keys=True)
    return cfg


def write_diffusers(path: str | os.PathLike, components: dict[str, dict[str, LoraTensors]],
                    extra_metadata: dict[str, str] | None = None) -> dict[str, str]:
    """One diffusers LoRA file (``load_lora_weights`` reads it): keys ``<component>.<dotted>.lora_A.weight``
    with per-component LoraConfigs in the ``lora_adapter_metadata`` header."""
    tensors: dict[str, torch.Tensor] = {}
    flat: dict = {}
    for comp, modules in components.items():
        if not modules:
            continue
        tensors.update(peft_tensors(modules, comp + "."))
        flat.update({f"{comp}.{k}": v for k, v in peft_config(modules).items()})
    meta = dict(extra_metadata or {}) | {"format": "pt", "lora_adapter_metadata": json.dumps(flat, indent=2, sort_keys=True)}
    write_safetensors(path, tensors, meta)
    return meta


__all__ = ["LoraTensors", "kohya_state_dict", "network_metadata", "write_kohya", "peft_tensors", "peft_config",
           "write_peft_folder", "write_diffusers", "atomic_file"]
