"""Train page: the form of :class:`.train_session.TrainForm`, Start / Cancel / Refresh, a status box
and the loss chart (:mod:`.lossplot`). Start is a generator that polls the job once a second until
it finishes (generators stream in gradio 3.41 and current alike); Refresh re-attaches after a reload."""
from __future__ import annotations

import time

from .compat import gradio
from .context import UiContext
from .lossplot import loss_plot
from .train_session import TrainForm, TrainSession

POLL_S = 1.0


def _form_inputs(gr, ctx: UiContext, host_model: bool = False):
    """``host_model``: a host factory (the A1111 tab) trains the host's loaded model with its own
    tokenizers, so the base model and tokenizer fields are hidden and empty there."""
    where = {kind: ctx.folders_note(kind) for kind in ("model", "dataset", "output")}
    with gr.Row():
        base = gr.Textbox(label="Base model: 'demo', a demo base file, an SD1/SD2/SDXL .safetensors checkpoint, "
                          f"or a diffusers folder{where['model']}", value="" if host_model else ctx.config.model or "demo",
                          visible=not host_model, elem_id="le-train-base")
        data = gr.Textbox(label=f"Image folder{where['dataset']} (captions in .txt next to the images)",
                          elem_id="le-train-data")
        out = gr.Textbox(label=f"Output name{where['output']}", value="my_lora", elem_id="le-train-out")
    with gr.Row():
        steps = gr.Number(value=200, precision=0, label="Steps", elem_id="le-train-steps")
        rank = gr.Number(value=4, precision=0, label="Rank")
        alpha = gr.Number(value=4.0, label="Alpha")
        unet_lr = gr.Number(value=1e-3, label="UNet learning rate")
        te_lr = gr.Number(value=5e-4, label="Text-encoder learning rate")
    with gr.Row():
        train_te = gr.Checkbox(value=False, label="train the text encoder")
        batch = gr.Number(value=4, precision=0, label="Batch size")
        resolution = gr.Number(value=512, precision=0, label="Resolution (diffusers/SD models)")
        seed = gr.Number(value=42, precision=0, label="Seed")
    inputs = [base, data, out, steps, rank, alpha, unet_lr, te_lr, train_te, batch, resolution, seed]
    if not host_model:
        with gr.Row():
            inputs.append(gr.Textbox(label="CLIP tokenizer folder (.safetensors checkpoints; empty: offline HF "
                                     "cache, then open_clip)", elem_id="le-train-tokenizer"))
    return inputs


def build_train_page(ctx: UiContext, host_factory=None) -> dict:
    """``host_factory(form) -> HostSetup`` replaces loading ``form.base`` (the A1111 tab trains the
    loaded checkpoint); the returned dict's ``inputs`` are the form's components, in TrainForm order."""
    gr = gradio()
    session = TrainSession(ctx, host_factory)
    inputs = _form_inputs(gr, ctx, host_model=host_factory is not None)
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="le-train-start")
        cancel = gr.Button("Cancel", elem_id="le-train-cancel")
        refresh = gr.Button("Refresh status", elem_id="le-train-refresh")
    with gr.Row():
        status = gr.Textbox(label="Status", lines=12, interactive=False, elem_id="le-train-status")
        plot = gr.Image(label="Loss", type="pil", interactive=False, elem_id="le-train-loss")

    def snapshot():
        text, losses, finished = session.status()
        return text, loss_plot(losses), finished

    def do_start(*values):
        yield "loading the base model and checking the dataset…", loss_plot(())
        form = TrainForm(*values)
        message = session.start(form)
        if message != "started":
            yield message, loss_plot(())
            return
        while True:
            text, img, finished = snapshot()
            yield text, img
            if finished:
                return
            time.sleep(POLL_S)

    def do_refresh():
        text, img, _ = snapshot()
        return text, img

    start.click(do_start, inputs=inputs, outputs=[status, plot])
    # Outside the queue: they must answer while Start's generator holds a worker (3.41's queue has one).
    cancel.click(lambda: session.cancel(), inputs=[], outputs=[status], queue=False)
    refresh.click(do_refresh, inputs=[], outputs=[status, plot], queue=False)
    return {"session": session, "inputs": inputs, "start": start, "cancel": cancel, "status": status, "plot": plot}
