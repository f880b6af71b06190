"""ComfyUI entry point: ComfyUI imports this file when the repository sits in ``custom_nodes/``.

It exports the nodes of ``comfy_nodes/`` and nothing A1111-specific. ComfyUI imports it as a
package under a path-derived name, so the nodes are reached by a relative import; they import
the core as ``lora_engine``, so the pack folder is appended to ``sys.path`` (appended: it never
shadows ComfyUI's own modules). Nothing here imports ComfyUI, so ``pytest`` can collect
``tests/`` with this file present.
"""
import os
import sys

_PACK = os.path.dirname(os.path.abspath(__file__))
if _PACK not in sys.path:
    sys.path.append(_PACK)

from .comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./comfy_nodes/web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
