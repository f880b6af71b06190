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
    """The pages in tabs. Lists are renewed from a quick rescan (unchanged files come from the cache)
    when the page loads and whenever a tab is opened: every page shows the files the Library shows."""
    quiet_environment()
    gr = gradio()
    refreshers = []
    tabs = []
    with gr.Blocks(title="lora-engine", analytics_enabled=False) as app:
        gr.Markdown("# lora-engine")
        with gr.Tabs():
            for title, build in PAGES:
                with gr.Tab(title, elem_id=f"le-page-{title.lower()}") as tab:
                    parts = build(ctx)
                tabs.append(tab)
                if parts.get("refresh"):
                    refreshers.append(parts["refresh"])
        inputs = [c for ins, _, _ in refreshers for c in ins]
        outputs = [c for _, outs, _ in refreshers for c in outs]

        def renew(*values):
            ctx.refresh()
            updates, i = [], 0
            for ins, _, fn in refreshers:
                updates += fn(*values[i:i + len(ins)])
                i += len(ins)
            return updates

        if outputs:
            app.load(renew, inputs=inputs, outputs=outputs)
            for tab in tabs:
                if hasattr(tab, "select"):
                    tab.select(renew, inputs=inputs, outputs=outputs)
    return app


def serve(config: UiConfig, host: str = "127.0.0.1", port: int = 7860, block: bool = True, scan: bool = True,
          auth: tuple[str, str] | None = None, on_started=None):
    """Scan the library, build the app and serve it (``auth``: ``(user, password)`` every request must
    log in with); ``on_started(url)`` once it answers; with ``block=False`` return ``(app, ctx)``."""
    from .compat import launch, wait

    ctx = UiContext(config)
    if scan:
        ctx.scan()
    app = build_app(ctx)
    launch(app, host, port, block=False, auth=auth)
    if on_started is not None:
        on_started(f"http://{host}:{port}/")
    if block:
        wait(app)
    return app, ctx
