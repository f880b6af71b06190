"""Generate page: a weight-sweep grid (rows = LoRAs, columns = weights) on the configured model
(:mod:`.sweep`). Without a model it says how to configure one."""
from __future__ import annotations

import os
import threading

from ...errors import LoraEngineError
from .compat import gradio, update
from .context import UiContext
from .progress import gradio_progress
from .sweep import DemoGenerator, SweepRunner, SweepSpec, parse_weights

NO_MODEL = ("**No model configured.** Start the server with `lora-engine serve --model demo` (the built-in demo "
            "model, no download) or `--model FILE` (a demo base file) to generate weight-sweep grids here.")
DIFFUSERS_TODO = ("**Diffusers folders are not supported on this page yet** (only the demo model). "
                  "Use `--model demo` here.")


class GenerateSession:
    """Loads the model on first use (with progress) and keeps one :class:`SweepRunner`."""

    def __init__(self, ctx: UiContext):
        self.ctx, self.runner, self._lock = ctx, None, threading.Lock()

    def runner_for(self, progress=None) -> SweepRunner:
        with self._lock:
            if self.runner is None:
                spec = self.ctx.config.model
                path = None if spec == "demo" else spec
                gen = DemoGenerator(path, progress=progress)
                self.runner = SweepRunner(gen, self.ctx.loras)
            return self.runner

    def run(self, prompt, loras, weights, seed, steps, guidance, progress=None):
        """(grid image or None, message)."""
        try:
            spec = SweepSpec(prompt or "", tuple(loras or ()), parse_weights(weights), int(seed), int(steps),
                             float(guidance))
            runner = self.runner_for(None if progress is None else (lambda d, t, loss: progress(d, t, "base model")))
            with self.ctx.lock:
                img, warnings = runner.grid(spec, progress)
        except LoraEngineError as e:
            return None, f"error: {e}"
        return img, "\n".join([f"{len(spec.loras)} × {len(spec.weights)} grid"] + [f"warning: {w}" for w in warnings])


def build_generate_page(ctx: UiContext) -> dict:
    gr = gradio()
    model = ctx.config.model
    if not model:
        return {"note": gr.Markdown(NO_MODEL, elem_id="le-gen-note")}
    if os.path.isdir(model):
        return {"note": gr.Markdown(DIFFUSERS_TODO, elem_id="le-gen-note")}
    session = GenerateSession(ctx)
    gr.Markdown(f"Model: `{model}`. Each row is a LoRA, each column a weight; every cell uses the same seed.")
    prompt = gr.Textbox(label="Prompt (may hold other <lora:…> tags)", value="a purple circle", elem_id="le-gen-prompt")
    with gr.Row():
        choices = ctx.choices()
        loras = gr.Dropdown(choices=choices, value=choices[:1], multiselect=True, label="LoRAs (rows)",
                            elem_id="le-gen-loras")
        weights = gr.Textbox(label="Weights (columns)", value="-1, -0.5, 0, 0.5, 1", elem_id="le-gen-weights")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="le-gen-seed")
        steps = gr.Number(value=20, precision=0, label="Steps", elem_id="le-gen-steps")
        guidance = gr.Number(value=3.0, label="Guidance")
        refresh = gr.Button("Refresh LoRA list")
    go = gr.Button("Generate grid", variant="primary", elem_id="le-gen-run")
    image = gr.Image(label="Grid", type="pil", interactive=False, elem_id="le-gen-grid")
    info = gr.Textbox(label="Result", lines=3, interactive=False, elem_id="le-gen-result")

    def run(p, ls, ws, s, st, g, progress=gr.Progress()):
        return session.run(p, ls, ws, s, st, g, gradio_progress(progress, "generate"))

    go.click(run, inputs=[prompt, loras, weights, seed, steps, guidance], outputs=[image, info])
    refresh.click(lambda: update(choices=ctx.choices()), inputs=[], outputs=[loras])
    return {"session": session, "run": go, "image": image, "info": info}
