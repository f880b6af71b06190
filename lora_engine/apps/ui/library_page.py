"""Library page: search box, architecture filter, sort order, rescan button, the card grid
(:mod:`.cards`) and a form that draws a missing preview with the configured model (:mod:`.preview`).

``build_library_page(ctx)`` creates its components inside the caller's ``gr.Blocks`` (the
standalone app, or a host's tab) and returns them by name.
"""
from __future__ import annotations

from ...text import clean_text
from .cards import ARCH_FILTERS, SORTS, cards_html, filter_entries, sort_entries
from .compat import gradio, update
from .context import UiContext
from .preview import make_preview, wanting_preview
from .progress import gradio_progress

EMPTY = ("No LoRA files here yet. `lora-engine demo --out demo_out` trains one for the demo model "
         "(a few minutes on a CPU); or start the server with --lora-dir DIR.")


def render_cards(ctx: UiContext, query: str = "", arch: str = "all", sort: str = "name") -> str:
    entries = ctx.library.entries
    # a file name decoded with surrogateescape would make the page's JSON unencodable
    return clean_text(cards_html(sort_entries(filter_entries(entries, query, arch), sort), len(entries), empty=EMPTY))


def build_library_page(ctx: UiContext) -> dict:
    gr = gradio()
    with gr.Row():
        search = gr.Textbox(label="Search", placeholder="name, alias, hash, metadata, description…",
                            elem_id="le-lib-search")
        arch = gr.Radio(list(ARCH_FILTERS), value="all", label="Architecture", elem_id="le-lib-arch")
        sort = gr.Radio(list(SORTS), value="name", label="Sort", elem_id="le-lib-sort")
        rescan = gr.Button("Rescan folders", elem_id="le-lib-rescan")
    status = gr.Markdown(f"Folders: {', '.join(ctx.config.lora_dirs) or '(none)'}", elem_id="le-lib-status")
    with gr.Accordion("Make a preview image" + ("" if ctx.config.model else " (needs --model)"), open=False):
        with gr.Row():
            target = gr.Dropdown(choices=ctx.choices(), value=wanting_preview(ctx), label="LoRA",
                                 elem_id="le-prev-lora")
            prompt = gr.Textbox(label="Prompt (empty: its most frequent training caption)", elem_id="le-prev-prompt")
            steps = gr.Number(value=20, precision=0, label="Steps", elem_id="le-prev-steps")
            make = gr.Button("Make preview", elem_id="le-prev-run")
        made = gr.Textbox(label="Preview", interactive=False, elem_id="le-prev-result")
    cards = gr.HTML(value=lambda: render_cards(ctx), elem_id="le-lib-cards")

    def do_rescan(query, arch_value, order, progress=gr.Progress()):
        report = ctx.scan(progress=gradio_progress(progress, "scan", total=None))
        note = (f"Scanned {report.files} files ({report.read} read, {report.reused} from cache) "
                f"in {report.seconds:.1f} s")
        note += "".join(f"\n- {w}" for w in report.warnings[:10])
        return clean_text(note), render_cards(ctx, query, arch_value, order)

    def do_filter(query, arch_value, order):
        return render_cards(ctx, query, arch_value, order)

    def do_preview(key, text, n, query, arch_value, order, progress=gr.Progress()):
        line = make_preview(ctx, key, text, int(n or 20), progress=gradio_progress(progress, "preview"))
        return line, render_cards(ctx, query, arch_value, order)

    def fresh(query, arch_value, order, chosen):
        keys = ctx.choices()
        return [render_cards(ctx, query, arch_value, order),
                update(choices=keys, value=chosen if chosen in keys else wanting_preview(ctx))]

    view = [search, arch, sort]
    rescan.click(do_rescan, inputs=view, outputs=[status, cards])
    make.click(do_preview, inputs=[target, prompt, steps, *view], outputs=[made, cards])
    search.submit(do_filter, inputs=view, outputs=[cards])
    for box in view:
        box.change(do_filter, inputs=view, outputs=[cards])
    return {"search": search, "arch": arch, "sort": sort, "rescan": rescan, "status": status, "cards": cards,
            "preview": make, "refresh": ([*view, target], [cards, target], fresh)}
