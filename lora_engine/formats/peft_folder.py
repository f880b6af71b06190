"""PEFT adapter folders (``adapter_model.safetensors`` + ``adapter_config.json``) and the
alpha conventions of PEFT configs / diffusers' ``lora_adapter_metadata`` header."""
from __future__ import annotations

import json
import math
import os
import re

from ..adapters import AlphaSpec
from ..errors import LoraFileError

WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_lora_weights.safetensors")


def is_peft_folder(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in WEIGHT_NAMES)


# Sub-folders of a multi-component PEFT folder (one adapter per model, as ``convert --to peft`` writes a LoRA
# on several models).
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def component_folders(path: str) -> list[tuple[str, str]]:
    """``[(sub-folder, component)]`` of a folder holding one PEFT adapter folder per component; [] when
    ``path`` is a PEFT folder itself or anything else."""
    if not os.path.isdir(path) or is_peft_folder(path):
        return []
    return [(os.path.join(path, c), c) for c in COMPONENTS if is_peft_folder(os.path.join(path, c))]


def component_name(name: str, component: str, sdxl: bool) -> str:
    """A module's canonical name inside its component's folder → its name in the combined LoRA: a text
    encoder's ``lora_te_*`` becomes ``lora_te1_*``/``lora_te2_*`` when the LoRA has two (SDXL)."""
    want = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}.get(component)
    if want and name.startswith(("lora_te_", "lora_te1_")):
        return want + name.split("_", 2)[2]
    return name


def folder_weights(path: str) -> str:
    for n in WEIGHT_NAMES:
        p = os.path.join(path, n)
        if os.path.isfile(p):
            return p
    raise LoraFileError(path, "folder has no adapter_model.safetensors")


MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a real adapter_config.json is a few KB; per-module patterns add ~100 bytes each


def _number(v) -> bool:
    """A JSON number that converts to a finite float (not a boolean, not 10**400)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def config_problem(cfg: dict) -> str | None:
    """What in a LoraConfig dict :class:`PeftAlpha` cannot use, or None: ``lora_alpha``/``alpha`` not a finite
    number, ``alpha_pattern`` not an object of regular expressions to numbers."""
    for k in ("lora_alpha", "alpha"):
        if k in cfg and not _number(cfg[k]):
            return f"{k} is {json.dumps(cfg[k])[:40]}, not a number"
    patterns = cfg.get("alpha_pattern")
    if patterns is None:
        return None
    if not isinstance(patterns, dict):
        return "alpha_pattern is not an object"
    for pattern, value in patterns.items():
        if not _number(value):
            return f"alpha_pattern {pattern[:60]!r} is {json.dumps(value)[:40]}, not a number"
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except (re.error, RecursionError, OverflowError) as e:
            return f"alpha_pattern {pattern[:60]!r} is not a regular expression ({e})"
    return None


def folder_config(path: str) -> dict:
    p = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(p):
        return {}
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise LoraFileError(p, f"unreadable adapter_config.json: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise LoraFileError(p, f"adapter_config.json is larger than {MAX_CONFIG_BYTES // 2**20} MB")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON; RecursionError: nested past Python's limit
        raise LoraFileError(p, f"unreadable adapter_config.json: {str(e)[:120]}") from None
    if not isinstance(cfg, dict):
        raise LoraFileError(p, "adapter_config.json is not an object")
    problem = config_problem(cfg)
    if problem:
        raise LoraFileError(p, f"adapter_config.json: {problem}")
    return cfg


def _pattern_value(patterns: dict, dotted: str):
    """PEFT's rule: a pattern matches ``(.*\\.)?(pattern)$``; the first matching key wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", dotted):
            return value
    return None


class PeftAlpha:
    """α per module from one LoraConfig dict (``r``, ``lora_alpha``, patterns, ``use_rslora``)."""

    def __init__(self, config: dict):
        self.config = config

    def for_module(self, dotted: str | None) -> AlphaSpec:
        c = self.config
        if "lora_alpha" not in c and "alpha" not in c:
            return AlphaSpec()
        alpha = c.get("lora_alpha", c.get("alpha"))
        if dotted is not None:
            pa = _pattern_value(c.get("alpha_pattern") or {}, dotted)
            if pa is not None:
                alpha = pa
        return AlphaSpec(alpha=float(alpha), rslora=bool(c.get("use_rslora", False)))


def diffusers_metadata_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers writes ``lora_adapter_metadata`` = JSON of ``{"unet.r": 4, "unet.lora_alpha": 8, ...}``
    (keys prefixed by component). Returns ``{component: config}``.

    Returns ``{}`` when the entry is absent or unusable (not JSON, not an object, a config that
    :func:`config_problem` refuses): the caller then falls back to α = rank."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(flat, dict):
        return {}
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp, _, field = k.partition(".")
        if field:
            out.setdefault(comp, {})[field] = v
        else:
            out.setdefault("", {})[k] = v
    if any(config_problem(cfg) for cfg in out.values()):
        return {}
    return out
