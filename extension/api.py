"""REST routes, registered from ``on_app_started(demo, app)``.

- ``GET /sdapi/v1/loras`` -> ``[{name, alias, path, metadata}]`` and ``POST /sdapi/v1/refresh-loras``,
  answered as A1111's built-in does (``extensions-builtin/Lora/lora_script.py`` ``api_networks``) so existing
  clients keep working;
- ``GET /lora-engine/v1/state``: mode, what is applied, cache, last warnings;
- ``GET /lora-engine/v1/metadata?name=``: one file's entry (hashes, metadata, sidecars, sd version);
- ``GET /lora-engine/v1/names``: what prompt autocomplete offers (``javascript/lora_engine.js``).
"""
from __future__ import annotations

from lora_engine.errors import LoraEngineError, NameResolutionError

from .page import card_weight


def list_loras(controller) -> list[dict]:
    lib = controller.get_library()
    return [{"name": e.stem, "alias": e.alias, "path": e.path, "metadata": e.metadata} for e in lib.entries]


def prompt_names(controller) -> list[dict]:
    """Per file: the name and weight a click on its card inserts, and its alias (to search by), so that
    autocomplete inserts exactly the card's tag. Our cards insert the shortest unique name (the
    sub-folder path when stems collide) with our default-weight setting; when the built-in Lora's cards
    are shown instead (tags handed over), they insert the alias (the stem under "Filename", or when the
    alias is taken) with A1111's default multiplier."""
    lib = controller.get_library()
    opts, settings = controller.opts, controller.settings()
    multiplier = getattr(opts, "extra_networks_default_multiplier", None) if opts is not None else None
    out = []
    for e in lib.entries:
        if controller.builtin_cards:
            name, default = _builtin_card_name(lib, e, opts), 1.0 if multiplier is None else float(multiplier)
        else:
            name, default = lib.preferred_name(e), settings.default_weight
        out.append({"name": name, "alias": e.alias, "weight": f"{card_weight(e, default):g}"})
    return out


def _builtin_card_name(lib, entry, opts) -> str:
    if getattr(opts, "lora_preferred_name", None) == "Filename":
        return entry.stem
    try:
        return entry.alias if lib.resolve(entry.alias) is entry else entry.stem
    except NameResolutionError:
        return entry.stem


def refresh(controller) -> dict:
    r = controller.refresh()
    return {"files": r.files, "read": r.read, "warnings": list(r.warnings)}


def metadata(controller, name: str) -> dict:
    try:
        return controller.entry(name).to_json()
    except LoraEngineError as e:
        return {"error": str(e)}


def register(controller, app) -> None:
    """Add the routes to A1111's FastAPI ``app``. Our routes replace the built-in's on the same paths
    only when the built-in is disabled (FastAPI keeps the first matching route)."""
    app.add_api_route("/sdapi/v1/loras", lambda: list_loras(controller), methods=["GET"])
    app.add_api_route("/sdapi/v1/refresh-loras", lambda: refresh(controller) and None, methods=["POST"])  # A1111 answers null
    app.add_api_route("/lora-engine/v1/state", lambda: controller.state(), methods=["GET"])
    app.add_api_route("/lora-engine/v1/metadata", lambda name: metadata(controller, name), methods=["GET"])
    app.add_api_route("/lora-engine/v1/names", lambda: prompt_names(controller), methods=["GET"])
    app.add_api_route("/lora-engine/v1/refresh", lambda: refresh(controller), methods=["POST"])
