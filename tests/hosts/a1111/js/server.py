"""Serves the A1111 1.10 prompt stand-in (``a1111_page.html`` + ``a1111_frontend.js``) with the real
``javascript/lora_engine.js`` on 127.0.0.1, next to the extension's real answers: ``/sdapi/v1/loras``
(``extension.api.list_loras``), ``/lora-engine/v1/names`` (``extension.api.prompt_names``) and the cards,
whose click inserts ``extension.page.card_fields``'s tag, all over a real LoRA folder and controller.

``LORA_ENGINE_JS=PATH`` serves another script instead (e.g. an older ``lora_engine.js`` to see which
tests it fails).
"""
from __future__ import annotations

import contextlib
import html
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from extension import api
from extension.page import card_fields

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
SCRIPT_URL = "/file=extensions/lora-engine/javascript/lora_engine.js"

# A1111 1.10's defaults for what these pages read, except the two default weights, set apart so a test
# can tell which one was inserted (ours: lora_engine_default_weight, used by our cards).
OPTS = {
    "keyedit_precision_attention": 0.1,
    "keyedit_precision_extra": 0.05,
    "keyedit_delimiters": ".,\\/!?%^*;:{}=`~() ",
    "keyedit_delimiters_whitespace": ["Tab", "Carriage Return", "Line Feed"],
    "keyedit_move": True,
    "disable_token_counters": False,
    "extra_networks_default_multiplier": 1.0,
    "extra_networks_add_text_separator": " ",
    "lora_engine_default_weight": 0.7,
}


def script_path() -> str:
    return os.environ.get("LORA_ENGINE_JS") or os.path.join(REPO, "javascript", "lora_engine.js")


def cards_html(controller) -> str:
    """One card per file, its onclick as A1111 1.10 builds it from the page item's ``prompt``
    (a JavaScript expression: our JSON string)."""
    lib = controller.get_library()
    out = []
    for e in lib.entries:
        name = lib.preferred_name(e)
        f = card_fields(e, name, controller.settings().default_weight, None)
        onclick = f"return cardClicked('txt2img', {json.dumps(f['tag'])}, {json.dumps(f['negative'])}, true)"
        out.append(f'<div class="card" data-name="{html.escape(name)}" onclick="{html.escape(onclick)}">'
                   f'<div class="actions"><span class="name">{html.escape(name)}</span></div></div>')
    return "\n".join(out)


def _page(controller, opts: dict) -> bytes:
    with open(os.path.join(HERE, "a1111_page.html"), encoding="utf-8") as f:
        text = f.read()
    return (text.replace("__OPTS__", json.dumps(opts)).replace("__CARDS__", cards_html(controller))
            .replace("__SCRIPT__", SCRIPT_URL).encode())


@contextlib.contextmanager
def serve(controller, opts: dict | None = None):
    """Yields the page's URL; every request is answered from the files and controller as they are then."""
    opts = dict(OPTS, **(opts or {}))

    def routes():
        with open(os.path.join(HERE, "a1111_frontend.js"), "rb") as f:
            frontend = f.read()
        with open(script_path(), "rb") as f:
            script = f.read()
        return {
            "/": ("text/html", _page(controller, opts)),
            "/standin/a1111_frontend.js": ("text/javascript", frontend),
            SCRIPT_URL: ("text/javascript", script),
            "/sdapi/v1/loras": ("application/json", json.dumps(api.list_loras(controller)).encode()),
            "/lora-engine/v1/names": ("application/json", json.dumps(api.prompt_names(controller)).encode()),
        }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            found = routes().get(self.path.split("?")[0])
            if found is None:
                self.send_error(404)
                return
            kind, body = found
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
