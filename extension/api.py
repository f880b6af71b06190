"""REST routes, registered from ``on_app_started(demo, app)``.

- ``GET /sdapi/v1/loras`` -> ``[{name, alias, path, metadata}]`` and ``POST /sdapi/v1/refresh-loras``,
  answered as A1111's built-in does (a1111.md §4.4) so existing clients keep working;
- ``GET /lora-engine/v1/state``: mode, what is applied, cache, last warnings;
- ``GET /lora-engine/v1/metadata?name=``: one file's entry (hashes, metadata, sidecars, sd version).
"""
from __future__ import annotations

from lora_engine.errors import LoraEngineError


def list_loras(controller) -> list[dict]:
    lib = controller.get_library()
    return [{"name": e.stem, "alias": e.alias, "path": e.path, "metadata": e.metadata} for e in lib.entries]


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
    app.add_api_route("/lora-engine/v1/refresh", lambda: refresh(controller), methods=["POST"])
