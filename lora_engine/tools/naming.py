"""Canonical names across several LoRA files: the first text encoder is ``lora_te_`` in SD1/SD2
files and ``lora_te1_`` in SDXL files; tools that combine files use one spelling for both."""
from __future__ import annotations

TE_ALIASES = ("lora_te1_", "lora_te_")


def unify_te_names(name_lists: list[list[str]]) -> list[dict[str, str]]:
    """Per input, {name: unified name}. ``lora_te1_`` when any input has a second encoder, else ``lora_te_``."""
    sdxl = any(n.startswith("lora_te2_") for names in name_lists for n in names)
    want = "lora_te1_" if sdxl else "lora_te_"
    out = []
    for names in name_lists:
        mapping = {}
        for n in names:
            for alias in TE_ALIASES:
                if n.startswith(alias):
                    n2 = want + n[len(alias):]
                    break
            else:
                n2 = n
            mapping[n] = n2
        out.append(mapping)
    return out
