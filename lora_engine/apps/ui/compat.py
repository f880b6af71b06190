"""The only place that knows which gradio is installed (A1111 ships 3.41; standalone uses current).

Everything else in :mod:`lora_engine.apps.ui` uses the components and events that behave the same in
3.41 and current gradio (Blocks, Tab, Row, Column, HTML, Markdown, Textbox, Number, Slider, Radio,
Dropdown, Checkbox, Image(type="pil"), Button, ``.click``/``.submit``/``.change``, generator
handlers, ``gr.Progress``, ``gr.update``) and calls these helpers for the rest: queueing and
launching, whose keyword arguments changed between major versions.
"""
from __future__ import annotations

import os


def gradio():
    """The gradio module, or a one-line :class:`~lora_engine.errors.LoraEngineError` naming the extra."""
    from ...errors import LoraEngineError

    try:
        import gradio as gr
    except ImportError as e:
        raise LoraEngineError(f"the web UI needs gradio ({e}); install it with: pip install 'lora-engine[ui]'") from None
    return gr


def major_version() -> int:
    return int(str(gradio().__version__).split(".")[0])


def update(**kwargs):
    """A property update for an output component (``gr.update`` exists in 3.41 and current)."""
    return gradio().update(**kwargs)


MAX_UPLOAD = "1mb"  # the UI has no upload fields; gradio's generic upload route stays small


def quiet_environment(host: str = "127.0.0.1") -> None:
    """No analytics or version checks over the network (both versions read these variables), and no
    proxy for the server's own requests to itself (gradio probes its local URL at start-up)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")
    for var in ("NO_PROXY", "no_proxy"):
        have = [h for h in os.environ.get(var, "").split(",") if h.strip()]
        os.environ[var] = ",".join(have + [h for h in ("127.0.0.1", "localhost", host) if h not in have])


def _accepts(fn, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def hide_api(blocks) -> None:
    """Leave every event out of gradio's API description. Gradio 6 embeds that description (with each
    dropdown's choices: file names) in the page it serves before login; the page itself calls the
    events by index, so hiding them changes nothing for it."""
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    for fn in fns:
        if hasattr(fn, "api_visibility"):
            fn.api_visibility = "private"
        elif hasattr(fn, "show_api"):
            fn.show_api = False


def launch(blocks, host: str, port: int, block: bool = True, share: bool = False, auth=None):
    """Queue (needed by ``gr.Progress`` and generators in 3.41; default later) and serve. 3.41's queue
    runs one event at a time unless told otherwise; later versions limit each listener separately.

    ``auth``: ``(user, password)`` or None. The upload size is capped where gradio supports it
    (``max_file_size``). Gradio's check that its own URL answers (a few short HTTP probes, which fail
    on a loaded machine and then raise "When localhost is not accessible…" although the server runs)
    is skipped where ``launch`` can be told to, and survived where it cannot."""
    quiet_environment(host)
    hide_api(blocks)
    if major_version() < 4:
        blocks.queue(concurrency_count=4)
    else:
        blocks.queue()
    kwargs = dict(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                  inbrowser=False, auth=auth)
    if major_version() < 4:
        kwargs["show_api"] = False
    if _accepts(blocks.launch, "max_file_size"):
        kwargs["max_file_size"] = MAX_UPLOAD
    if _accepts(blocks.launch, "footer_links"):
        kwargs["footer_links"] = ["gradio", "settings"]  # no "Use via API" link: the API is hidden
    if _accepts(blocks.launch, "_frontend"):
        kwargs["_frontend"] = False  # only switches off that probe
    try:
        result = blocks.launch(**kwargs)
    except ValueError as e:
        if "localhost is not accessible" not in str(e) or not getattr(blocks, "server", None):
            raise
        result = None  # the server is up; only gradio's self-check timed out
    if block:
        wait(blocks)
    return result


def wait(blocks) -> None:
    """Block until Ctrl+C, then close the server."""
    import time

    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        blocks.close()
