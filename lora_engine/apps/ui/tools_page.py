"""Tools page: inspect, merge, resize, convert, extract, bake (the CLI's operations, same code in
:mod:`lora_engine.tools`), each with a ``gr.Progress`` bar and a result box. The operations
themselves are in :mod:`.tool_ops` (no gradio)."""
from __future__ import annotations

from . import tool_ops
from .compat import gradio, update
from .context import UiContext
from .progress import gradio_progress


def _lora_dropdown(gr, ctx: UiContext, label: str, elem_id: str):
    """The library's files; the default is the first readable one (the list is renewed on every visit)."""
    return gr.Dropdown(choices=ctx.choices(), value=ctx.default_choice(), label=label, elem_id=elem_id)


def _overwrite(gr, ctx: UiContext):
    """Shown only where the server allows replacing files (the operations check the rule again)."""
    return gr.Checkbox(label="overwrite", value=False, visible=ctx.may_overwrite(True))


def _result(gr, elem_id: str):
    return gr.Textbox(label="Result", lines=8, interactive=False, elem_id=elem_id)


def _inspect(gr, ctx):
    name = _lora_dropdown(gr, ctx, "LoRA", "le-inspect-lora")
    go = gr.Button("Inspect", variant="primary", elem_id="le-inspect-run")
    out = _result(gr, "le-inspect-result")

    def run(n, progress=gr.Progress()):
        return tool_ops.inspect_op(ctx, n, gradio_progress(progress, "inspect"))
    go.click(run, inputs=[name], outputs=[out])
    return [name]


def _method_inputs(gr, prefix: str):
    with gr.Row():
        method = gr.Radio(list(tool_ops.METHODS), value="fixed", label="Rank selection", elem_id=f"{prefix}-method")
        param = gr.Textbox(label="Parameter (dynamic methods)", value="", elem_id=f"{prefix}-param")
    return method, param


def _resize(gr, ctx):
    name = _lora_dropdown(gr, ctx, "LoRA", "le-resize-lora")
    with gr.Row():
        rank = gr.Number(value=4, precision=0, label="New rank (cap for dynamic methods)", elem_id="le-resize-rank")
        out = gr.Textbox(label="Output name (in the output folder)", value="resized", elem_id="le-resize-out")
        overwrite = _overwrite(gr, ctx)
    method, param = _method_inputs(gr, "le-resize")
    go = gr.Button("Resize", variant="primary", elem_id="le-resize-run")
    res = _result(gr, "le-resize-result")

    def run(n, r, o, m, p, ow, progress=gr.Progress()):
        return tool_ops.resize_op(ctx, n, o, r, m, p, ow, gradio_progress(progress, "resize"))
    go.click(run, inputs=[name, rank, out, method, param, overwrite], outputs=[res])
    return [name]


def _merge(gr, ctx):
    gr.Markdown("One LoRA per line: `NAME[:WEIGHT]` (library name or path; negative weights allowed).")
    specs = gr.Textbox(label="LoRAs", lines=4, value="\n".join(f"{k}:1" for k in ctx.choices()[:2]),
                       elem_id="le-merge-specs")
    with gr.Row():
        rank = gr.Number(value=0, precision=0, label="SVD rank (0 = exact, concatenated ranks)", elem_id="le-merge-rank")
        out = gr.Textbox(label="Output name", value="merged", elem_id="le-merge-out")
        overwrite = _overwrite(gr, ctx)
    method, param = _method_inputs(gr, "le-merge")
    go = gr.Button("Merge", variant="primary", elem_id="le-merge-run")
    res = _result(gr, "le-merge-result")

    def run(s, r, o, m, p, ow, progress=gr.Progress()):
        return tool_ops.merge_op(ctx, s, o, r, m, p, ow, gradio_progress(progress, "merge"))
    go.click(run, inputs=[specs, rank, out, method, param, overwrite], outputs=[res])
    return []


def _convert(gr, ctx):
    name = _lora_dropdown(gr, ctx, "LoRA (file or PEFT folder path)", "le-convert-lora")
    with gr.Row():
        to = gr.Radio(["kohya", "peft", "diffusers"], value="peft", label="To", elem_id="le-convert-to")
        out = gr.Textbox(label="Output name (a folder for peft)", value="converted", elem_id="le-convert-out")
        overwrite = _overwrite(gr, ctx)
    go = gr.Button("Convert", variant="primary", elem_id="le-convert-run")
    res = _result(gr, "le-convert-result")

    def run(n, t, o, ow, progress=gr.Progress()):
        return tool_ops.convert_op(ctx, n, o, t, ow, gradio_progress(progress, "convert"))
    go.click(run, inputs=[name, to, out, overwrite], outputs=[res])
    return [name]


def _extract(gr, ctx):
    with gr.Row():
        base = gr.Textbox(label="Base checkpoint (.safetensors or diffusers folder)" + ctx.folders_note("model"),
                          elem_id="le-extract-base")
        tuned = gr.Textbox(label="Fine-tuned checkpoint (same architecture)", elem_id="le-extract-tuned")
    with gr.Row():
        rank = gr.Number(value=8, precision=0, label="Rank", elem_id="le-extract-rank")
        out = gr.Textbox(label="Output name", value="extracted", elem_id="le-extract-out")
        overwrite = _overwrite(gr, ctx)
    go = gr.Button("Extract", variant="primary", elem_id="le-extract-run")
    res = _result(gr, "le-extract-result")

    def run(b, t, r, o, ow, progress=gr.Progress()):
        return tool_ops.extract_op(ctx, b, t, o, r, gradio_progress(progress, "extract"), ow)
    go.click(run, inputs=[base, tuned, rank, out, overwrite], outputs=[res])
    return []


def _bake(gr, ctx):
    ckpt = gr.Textbox(label="Checkpoint (.safetensors or diffusers folder)" + ctx.folders_note("model"),
                      elem_id="le-bake-ckpt")
    gr.Markdown("One LoRA per line: `NAME[:TE[:UNET]]` (one number sets both strengths).")
    specs = gr.Textbox(label="LoRAs", lines=3, elem_id="le-bake-specs")
    with gr.Row():
        out = gr.Textbox(label="Output name (file or folder, must differ from the input)", value="baked.safetensors",
                         elem_id="le-bake-out")
        overwrite = _overwrite(gr, ctx)
    go = gr.Button("Bake", variant="primary", elem_id="le-bake-run")
    res = _result(gr, "le-bake-result")

    def run(c, s, o, ow, progress=gr.Progress()):
        return tool_ops.bake_op(ctx, c, s, o, ow, gradio_progress(progress, "bake"))
    go.click(run, inputs=[ckpt, specs, out, overwrite], outputs=[res])
    return []


def build_tools_page(ctx: UiContext) -> dict:
    gr = gradio()
    gr.Markdown(f"Outputs are written to `{ctx.config.out_dir}` (names inside it; no absolute paths or `..`)."
                + ("" if ctx.may_overwrite(True) else " Existing files are never replaced."))
    dropdowns = []
    for title, builder in (("Inspect", _inspect), ("Merge", _merge), ("Resize", _resize), ("Convert", _convert),
                           ("Extract", _extract), ("Bake", _bake)):
        with gr.Tab(title, elem_id=f"le-tool-{title.lower()}"):
            dropdowns += builder(gr, ctx)

    def fresh(*current):
        choices = ctx.choices()
        return [update(choices=choices, value=ctx.default_choice(c)) for c in current]
    return {"dropdowns": dropdowns, "refresh": (dropdowns, dropdowns, fresh)}
