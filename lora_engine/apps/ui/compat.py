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


def quiet_environment() -> None:
    """No analytics or version checks over the network (both versions read these variables)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")


def launch(blocks, host: str, port: int, block: bool = True, share: bool = False):
    """Queue (needed by ``gr.Progress`` and generators in 3.41; default later) and serve. 3.41's queue
    runs one event at a time unless told otherwise; later versions limit each listener separately."""
    if major_version() < 4:
        blocks.queue(concurrency_count=4)
    else:
        blocks.queue()
    kwargs = dict(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=True,
                  inbrowser=False)
    if major_version() < 4:
        kwargs["show_api"] = False
    return blocks.launch(**kwargs)
