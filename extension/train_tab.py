"""The top-level "LoRA Training" tab (``on_ui_tabs``; docs/hosts.md): the web UI's Train page
(:func:`lora_engine.apps.ui.train_page.build_train_page`) with a host factory that trains the checkpoint A1111
has loaded, plus a preset chooser and a samples gallery.

- host: :func:`.train_host.a1111_train_host` over ``shared.sd_model`` (the form has no base model field here);
- lock: ``modules.call_queue.queue_lock``, held by the job for the whole run, so no generation (which
  takes the same lock in ``wrap_gradio_gpu_call``) overlaps it; inside it the run is ``shared.state``'s
  job (``begin``/``end``, :func:`.train_host.queue_job`);
- Interrupt: A1111's button (``shared.state.interrupted``) is asked after every step; pressed, the job
  stops after that step with the LoRA saved, as the tab's own Cancel does;
- engine: our runtime's engine for that model, whose LoRAs the trainer takes off and puts back;
- presets: ``sd15_*`` / ``sdxl_*`` character/style (``lora_engine.train.presets``); choosing one fills
  the form fields it names and the rest of it goes under the form's settings;
- samples: with sample prompts, every N steps ``processing.process_images`` renders them (txt2img, seed =
  prompt index) with the LoRA being trained hooked in.

:class:`TrainTab` is the host-free part (tested without A1111); ``on_ui_tabs``/``register`` touch A1111.
"""
from __future__ import annotations

import dataclasses
import logging
import re

from lora_engine.errors import TrainingError
from lora_engine.train.presets import PRESETS
from lora_engine.apps.ui.train_session import HostSetup, TrainForm

from .train_host import a1111_train_host, interrupted, queue_job

log = logging.getLogger("lora_engine")
FORM_FIELDS = tuple(f.name for f in dataclasses.fields(TrainForm))


def default_preset(sd_model) -> str:
    return "sdxl_character" if getattr(sd_model, "is_sdxl", False) else "sd15_character"


def preset_form_values(name: str) -> dict:
    """The preset's values for the form's own fields (rank, alpha, learning rates, batch, resolution...);
    none for ``"auto"`` (the model decides at start)."""
    return {k: v for k, v in PRESETS.get(name, {}).items() if k in FORM_FIELDS}


@dataclasses.dataclass
class TrainTab:
    """What the tab's host factory needs: how to get the model, the lock, the engine and the sampler."""

    get_model: object  # () -> sd_model
    lock: object = None
    state: object = None  # A1111's shared.state: its Interrupt stops the run after the current step
    get_engine: object = None  # (sd_model) -> LoraEngine | None
    make_sampler: object = None  # (width, height) -> sample(prompts, step)
    preset: str | None = None  # None: sd15_character, or sdxl_character on an SDXL model
    sample_prompts: tuple = ()
    sample_every: int = 0

    def setup(self, form: TrainForm) -> HostSetup:
        sd_model = self.get_model()
        if sd_model is None:
            raise TrainingError("no checkpoint is loaded")
        if getattr(sd_model, "lowvram", False):
            raise TrainingError("training needs the whole model on the GPU: restart without --lowvram/--medvram")
        info = getattr(sd_model, "sd_checkpoint_info", None)
        host = a1111_train_host(sd_model, model_name=getattr(info, "name_for_extra", "") or "")
        settings = dict(PRESETS[self.preset or default_preset(sd_model)])
        tagged = [p for p in self.sample_prompts if re.search(r"<(lora|lyco):", p)]
        if tagged:  # they would merge LoRAs into the weights being trained on
            raise TrainingError(f"sample prompt {tagged[0]!r}: LoRA tags cannot be used while training")
        if self.sample_prompts and self.sample_every > 0 and self.make_sampler is not None:
            host.sample = self.make_sampler(int(form.resolution), int(form.resolution))
            settings |= {"sample_prompts": tuple(self.sample_prompts), "sample_every_steps": int(self.sample_every)}
        engine = self.get_engine(sd_model) if self.get_engine is not None else None
        if self.state is None:
            return HostSetup(host=host, settings=settings, lock=self.lock, engine=engine)
        state = self.state
        return HostSetup(host=host, settings=settings, lock=queue_job(self.lock, state), engine=engine,
                         stop=lambda: interrupted(state))


# ---- A1111 only below ----------------------------------------------------------------------------


def _engine_of(sd_model):
    from .callbacks import controller

    runtime = controller().runtime
    return runtime.engine if runtime is not None and runtime.sd_model is sd_model else None


def _restore_builtin_lora() -> None:
    """The built-in Lora restores its merged deltas lazily (at a layer's next forward); unload its networks first."""
    try:
        import networks  # extensions-builtin/Lora, on sys.path in A1111
        networks.load_networks([])
    except Exception as e:  # disabled built-in, or Forge: nothing of it to restore
        log.debug("lora-engine: built-in Lora not restored: %s", e)


def _a1111_sampler(width: int, height: int, steps: int = 20, cfg_scale: float = 7.0):
    from modules import processing, shared

    def sample(prompts: list[str], step: int) -> list:
        images = []
        for i, prompt in enumerate(prompts):
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=shared.sd_model, prompt=prompt, negative_prompt="", seed=i, steps=steps,
                cfg_scale=cfg_scale, width=width, height=height, do_not_save_samples=True, do_not_save_grid=True)
            try:
                images += processing.process_images(p).images[:1]
            finally:
                p.close()
        return images

    return sample


def _a1111_tab() -> TrainTab:
    from modules import call_queue, shared  # shared.sd_model is read at start only: it may be loading now

    def get_model():
        _restore_builtin_lora()
        return shared.sd_model

    return TrainTab(get_model=get_model, lock=call_queue.queue_lock, state=shared.state, get_engine=_engine_of,
                    make_sampler=_a1111_sampler)


def _ui_context():
    from lora_engine.apps.ui.context import UiConfig, UiContext

    from .callbacks import controller

    c = controller()
    folders = tuple(c.folders())
    config = UiConfig(lora_dirs=folders, output_dir=folders[0] if folders else None, hash_files=False, confine=False)
    return UiContext(config, library=c.get_library())  # output lands in the Lora folder our cards list


def on_ui_tabs():
    from lora_engine.apps.ui.compat import gradio
    from lora_engine.apps.ui.train_page import build_train_page

    gr = gradio()
    tab = _a1111_tab()
    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.Markdown("Trains a LoRA on the checkpoint loaded in the WebUI; "
                    "generation waits while a run holds the queue. A preset fills the form; its other settings "
                    "(optimizer, schedule, min-SNR, LoCon, flip...) apply under the form's values.")
        with gr.Row():
            preset = gr.Dropdown(choices=["auto", *PRESETS], value="auto", label="Preset (auto: character preset "
                                 "of the loaded model's family)", elem_id="le-train-preset")
            prompts = gr.Textbox(label="Sample prompts (one per line)", lines=2, elem_id="le-train-sample-prompts")
            every = gr.Number(value=0, precision=0, label="Sample every N steps (0: never)")
        page = build_train_page(_ui_context(), host_factory=tab.setup)
        with gr.Row():
            show = gr.Button("Show samples", elem_id="le-train-show-samples")
        gallery = gr.Gallery(label="Samples", elem_id="le-train-samples")
        fields = [FORM_FIELDS[i] for i in range(len(page["inputs"]))]

        def choose(name):
            tab.preset = name if name in PRESETS else None
            values = preset_form_values(name)
            return [gr.update(value=values[f]) if f in values else gr.update() for f in fields]

        def options(text, n):
            tab.sample_prompts = tuple(line.strip() for line in (text or "").splitlines() if line.strip())
            tab.sample_every = int(n or 0)

        def samples():
            job = page["session"].job
            return [img for _, imgs in (job.status().samples if job else ()) for img in imgs]

        preset.change(choose, inputs=[preset], outputs=page["inputs"])
        prompts.change(options, inputs=[prompts, every], outputs=[])
        every.change(options, inputs=[prompts, every], outputs=[])
        show.click(samples, inputs=[], outputs=[gallery], queue=False)
    return [(blocks, "LoRA Training", "lora_training")]


def register() -> None:
    from modules import script_callbacks

    script_callbacks.on_ui_tabs(on_ui_tabs)
