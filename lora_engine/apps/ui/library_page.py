"""Library page: search box, architecture filter, rescan button, and the cards (:mod:`.cards`).

``build_library_page(ctx)`` creates its components inside the caller's ``gr.Blocks`` (the
standalone app, or a host's tab) and returns them by name.
"""
from __future__ import annotations

from ...text import clean_text
from .cards import ARCH_FILTERS, cards_html, filter_entries
from .compat import gradio
from .context import UiContext
from .progress import gradio_progress


def render_cards(ctx: UiContext, query: str = "", arch: str = "all") -> str:
    entries = ctx.library.entries
    # a file name decoded with surrogateescape would make the page's JSON unencodable
    return clean_text(cards_html(filter_entries(entries, query, arch), len(entries)))


def build_library_page(ctx: UiContext) -> dict:
    gr = gradio()
    with gr.Row():
        search = gr.Textbox(label="Search", placeholder="name, alias, hash, metadata, description…",
                            elem_id="le-lib-search")
        arch = gr.Radio(list(ARCH_FILTERS), value="all", label="Architecture", elem_id="le-lib-arch")
        rescan = gr.Button("Rescan folders", elem_id="le-lib-rescan")
    status = gr.Markdown(f"Folders: {', '.join(ctx.config.lora_dirs) or '(none)'}", elem_id="le-lib-status")
    cards = gr.HTML(value=lambda: render_cards(ctx), elem_id="le-lib-cards")

    def do_rescan(query, arch_value, progress=gr.Progress()):
        report = ctx.scan(progress=gradio_progress(progress, "scan", total=None))
        note = (f"Scanned {report.files} files ({report.read} read, {report.reused} from cache) "
                f"in {report.seconds:.1f} s")
        note += "".join(f"\n- {w}" for w in report.warnings[:10])
        return clean_text(note), render_cards(ctx, query, arch_value)

    def do_filter(query, arch_value):
        return render_cards(ctx, query, arch_value)

    rescan.click(do_rescan, inputs=[search, arch], outputs=[status, cards])
    search.submit(do_filter, inputs=[search, arch], outputs=[cards])
    search.change(do_filter, inputs=[search, arch], outputs=[cards])
    arch.change(do_filter, inputs=[search, arch], outputs=[cards])
    return {"search": search, "arch": arch, "rescan": rescan, "status": status, "cards": cards}
