"""The standalone web UI: one ``gr.Blocks`` with the Library, Tools, Train and Generate pages.

Each page is built by a function that only adds components to the current Blocks, so a host (the
A1111 tab) can place the same pages inside its own layout: ``with gr.Blocks() as tab:
build_tools_page(ctx)``.
"""
from __future__ import annotations

from .compat import gradio, quiet_environment
from .context import UiConfig, UiContext
from .generate_page import build_generate_page
from .library_page import build_library_page
from .tools_page import build_tools_page
from .train_page import build_train_page

PAGES = (("Library", build_library_page), ("Tools", build_tools_page), ("Train", build_train_page),
         ("Generate", build_generate_page))


def build_app(ctx: UiContext):
    quiet_environment()
    gr = gradio()
    with gr.Blocks(title="lora-engine", analytics_enabled=False) as app:
        gr.Markdown("# lora-engine")
        with gr.Tabs():
            for title, build in PAGES:
                with gr.Tab(title, elem_id=f"le-page-{title.lower()}"):
                    build(ctx)
    return app


def serve(config: UiConfig, host: str = "127.0.0.1", port: int = 7860, block: bool = True, scan: bool = True):
    """Scan the library, build the app and serve it; with ``block=False`` return ``(app, ctx)``."""
    from .compat import launch

    ctx = UiContext(config)
    if scan:
        ctx.scan()
    app = build_app(ctx)
    launch(app, host, port, block=block)
    return app, ctx
