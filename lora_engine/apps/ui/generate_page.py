"""Generate page: a weight-sweep grid (rows = LoRAs, columns = weights) on the configured model
(:mod:`.sweep`). Without a model it says how to configure one."""
from __future__ import annotations

import os

from .compat import gradio, update
from .context import UiContext
from .progress import gradio_progress

NO_MODEL = ("**No model configured.** Start the server with `lora-engine serve --model demo` (the built-in demo "
            "model, no download) or `--model FILE` (a demo base file) to generate weight-sweep grids here.")
DIFFUSERS_TODO = ("**Diffusers folders are not supported on this page yet** (only the demo model). "
                  "Use `--model demo` here.")


def build_generate_page(ctx: UiContext) -> dict:
    gr = gradio()
    model = ctx.config.model
    if not model:
        return {"note": gr.Markdown(NO_MODEL, elem_id="le-gen-note")}
    if os.path.isdir(model):
        return {"note": gr.Markdown(DIFFUSERS_TODO, elem_id="le-gen-note")}
    session = ctx.generate_session()
    gr.Markdown(f"Model: `{model}`. Each row is a LoRA, each column a weight; every cell uses the same seed.")
    prompt = gr.Textbox(label="Prompt (may hold other <lora:…> tags)", value="a purple circle", elem_id="le-gen-prompt")
    with gr.Row():
        first = ctx.default_choice()
        loras = gr.Dropdown(choices=ctx.choices(), value=[first] if first else [], multiselect=True,
                            label="LoRAs (rows; unreadable files are skipped)", elem_id="le-gen-loras")
        weights = gr.Textbox(label="Weights (columns)", value="-1, -0.5, 0, 0.5, 1", elem_id="le-gen-weights")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="le-gen-seed")
        steps = gr.Number(value=20, precision=0, label="Steps", elem_id="le-gen-steps")
        guidance = gr.Number(value=3.0, label="Guidance")
    go = gr.Button("Generate grid", variant="primary", elem_id="le-gen-run")
    image = gr.Image(label="Grid", type="pil", interactive=False, elem_id="le-gen-grid")
    info = gr.Textbox(label="Result", lines=3, interactive=False, elem_id="le-gen-result")

    def run(p, ls, ws, s, st, g, progress=gr.Progress()):
        return session.run(p, ls, ws, s, st, g, gradio_progress(progress, "generate"))

    def fresh(chosen):
        keys = ctx.choices()
        kept = [k for k in (chosen or []) if k in keys]
        first = ctx.default_choice()
        return [update(choices=keys, value=kept or ([first] if first else []))]

    go.click(run, inputs=[prompt, loras, weights, seed, steps, guidance], outputs=[image, info])
    return {"session": session, "run": go, "image": image, "info": info, "refresh": ([loras], [loras], fresh)}
