"""The "Lora" extra-networks page (cards) for our library, replacing the built-in's page.

Item fields follow ``modules.ui_extra_networks.ExtraNetworksPage`` (docs/hosts.md): ``prompt``
is a JavaScript expression; a click inserts ``<lora:NAME:W>`` with the user metadata's
"preferred weight" (else our default-weight setting) plus its "activation text". A card whose
architecture does not match the loaded checkpoint gets a badge line in its description.
"""
from __future__ import annotations

import dataclasses
import json
import os

from lora_engine.library.index import read_sidecars

ARCH_OF_MODEL = (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1"))


def model_architecture(sd_model) -> str | None:
    for flag, arch in ARCH_OF_MODEL:
        if getattr(sd_model, flag, False):
            return arch
    return None


def card_weight(entry, default_weight: float) -> float:
    """The weight a card (and prompt autocomplete) inserts: the user metadata's "preferred weight",
    0 or missing meaning ``default_weight``."""
    try:
        return float((entry.sidecars.user_metadata or {}).get("preferred weight") or 0) or default_weight
    except (TypeError, ValueError):
        return default_weight


def card_fields(entry, name: str, default_weight: float, model_arch: str | None) -> dict:
    """Host-free part of a card: the tag a click inserts, description with badge, search terms."""
    user = entry.sidecars.user_metadata or {}
    weight = card_weight(entry, default_weight)
    activation = str(user.get("activation text") or "").strip()
    badge = ""
    if model_arch and entry.architecture not in (model_arch, "unknown", "other"):
        badge = f"⚠ {entry.architecture.upper()} LoRA, the loaded model is {model_arch.upper()}\n"
    tag = f"<lora:{name}:{weight:g}>" + (f" {activation}" if activation else "")
    return {"tag": tag, "negative": str(user.get("negative text") or "").strip(),
            "description": badge + (entry.sidecars.description or ""),
            "search_terms": [entry.key, entry.alias] + [h for h in (entry.short_hash, entry.sha256) if h]}


def fresh_sidecars(entry):
    """``entry`` with its preview/description/user metadata read again from disk."""
    folder = os.path.dirname(entry.path)
    try:
        siblings = set(os.listdir(folder))
    except OSError:
        return entry
    sidecars, _ = read_sidecars(folder, entry.stem, siblings)
    return dataclasses.replace(entry, sidecars=sidecars)


def make_page(controller):
    """Instantiate the A1111 page class (A1111 only)."""
    from modules import shared, ui_extra_networks

    class LoraEnginePage(ui_extra_networks.ExtraNetworksPage):
        lora_engine = True  # tells our page from the built-in's, which has the same name (``one_lora_page``)

        def __init__(self):
            super().__init__("Lora")
            self.allow_negative_prompt = True

        def refresh(self):
            controller.refresh()

        def create_item(self, name, index=None, enable_filter=True):
            lib = controller.get_library()
            entry = next((e for e in lib.entries if e.key == name), None)
            if entry is None:
                return None
            entry = fresh_sidecars(entry)  # the metadata editor may have just written {stem}.json
            shown = lib.preferred_name(entry)
            f = card_fields(entry, shown, controller.settings().default_weight, model_architecture(shared.sd_model))
            path = os.path.splitext(entry.path)[0]
            return {
                "name": shown, "filename": entry.path, "shorthash": controller.known_short_hash(entry) or "",
                "preview": self.find_preview(path), "description": f["description"],
                "search_terms": f["search_terms"], "local_preview": f"{path}.{shared.opts.samples_format}",
                "metadata": entry.metadata, "sort_keys": {"default": index or 0, **self.get_sort_keys(entry.path)},
                "prompt": json.dumps(f["tag"]), "negative_prompt": json.dumps(f["negative"]),
                "user_metadata": entry.sidecars.user_metadata,
            }

        def list_items(self):
            for i, entry in enumerate(controller.get_library().entries):
                item = self.create_item(entry.key, i)
                if item is not None:
                    yield item

        def allowed_directories_for_previews(self):
            return controller.folders()

        def create_user_metadata_editor(self, ui, tabname):
            from .metadata_editor import make_editor

            return make_editor(controller, ui, tabname, self)

    return LoraEnginePage()


def register(controller) -> None:
    """``on_before_ui``: replace the built-in "Lora" page (same title, same element ids) with ours."""
    from modules import ui_extra_networks

    ui_extra_networks.extra_pages[:] = [p for p in ui_extra_networks.extra_pages if p.name != "lora"]
    ui_extra_networks.register_page(make_page(controller))


def one_lora_page(pages: list, builtin_cards: bool) -> list:
    """``pages`` with one "Lora" page left: ours, or the other one (the built-in's) while its cards are
    shown instead of ours. Unchanged when that one is missing."""
    lora = [p for p in pages if p.name == "lora"]
    keep = [p for p in lora if getattr(p, "lora_engine", False) != builtin_cards][:1]
    if not keep or len(lora) == 1:
        return list(pages)
    return [p for p in pages if p.name != "lora" or p is keep[0]]


def take_back(controller) -> int:
    """Leave one "Lora" page in A1111's list (:func:`one_lora_page`); returns how many were dropped."""
    from modules import ui_extra_networks

    before = len(ui_extra_networks.extra_pages)
    ui_extra_networks.extra_pages[:] = one_lora_page(ui_extra_networks.extra_pages, controller.builtin_cards)
    return before - len(ui_extra_networks.extra_pages)
