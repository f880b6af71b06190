"""Names in written files. Module names: the first text encoder is ``lora_te_`` in SD1/SD2 files and
``lora_te1_`` in SDXL files; tools that combine files use one spelling for both. Titles: a file a tool
writes is titled by its own name, not its source's, so a resized copy is told apart from the original."""
from __future__ import annotations

import os

TE_ALIASES = ("lora_te1_", "lora_te_")


def titled(metadata: dict, out: str | os.PathLike) -> dict:
    """``metadata`` with ``ss_output_name`` (the title UIs show; and ``modelspec.title`` where present)
    set to the stem of the file being written."""
    stem = os.path.splitext(os.path.basename(os.fspath(out)))[0]
    keys = ("ss_output_name", "modelspec.title") if "modelspec.title" in metadata else ("ss_output_name",)
    return dict(metadata) | dict.fromkeys(keys, stem)


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
