"""Text-to-image through a local diffusers pipeline, with A1111 ``<lora:…>`` tags in the prompt.

    result = generate(GenerateOptions(model_dir, "a cat <lora:style:0.8>", lora_dirs=["loras"]))
    result.images   # PIL images
    result.warnings # unknown names, unmatched keys, tag problems (one line each)

Flow: :func:`lora_engine.syntax.prompt.parse_prompt` removes the tags from both prompts; each name is
resolved by :class:`lora_engine.library.index.LoraLibrary`, read through :class:`lora_engine.library.parsed.LoraCache`
and applied by :class:`lora_engine.engine.LoraEngine` (merged mode) over a container whose children
are the pipeline's ``unet`` or ``transformer`` and its text encoders, so canonical kohya names map
through :func:`lora_engine.keymap.build_keymap`. The pipeline runs on the cleaned prompt and the
weights are restored bit-exact afterwards (also on error or Ctrl+C). Image ``i`` uses seed ``seed + i``
(as A1111 does), so one image of a batch can be reproduced alone.

The model is a diffusers Stable Diffusion (XL), Flux.1 (``FluxPipeline``: dev, schnell, Krea), Chroma
(``ChromaPipeline``) or SD3/SD3.5 (``StableDiffusion3Pipeline``) folder, told apart by ``model_index.json``, or the built-in demo model
(``"demo"`` or a demo base file, :class:`DemoPipeline`): the same tags, library, cache and engine, the demo's
own sampler.

diffusers is an optional dependency (the ``models`` extra); it is imported only here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..errors import LoraEngineError, ModelFolderError, first_line

PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux",
             "ChromaPipeline": "chroma", "StableDiffusion3Pipeline": "sd3"}
# the guidance scale each pipeline is used with when --cfg is not given (Flux: its distilled guidance; the
# pipelines' own defaults for Chroma and SD3)
DEFAULT_CFG = {"sd": 7.0, "sdxl": 7.0, "flux": 3.5, "chroma": 5.0, "sd3": 7.0}
# pipeline parts the engine patches: the denoiser and every text encoder (the key map finds each by its tensors)
MODEL_PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
DEMO_SCALE = 4  # the demo model draws 32x32 pixels; images are saved 4x larger, each pixel a block


@dataclass(frozen=True)
class GenerateOptions:
    model_dir: str
    prompt: str
    negative: str = ""
    lora_dirs: tuple[str, ...] = ()
    steps: int = 20
    width: int | None = None  # None: the pipeline's default size
    height: int | None = None
    seed: int = 0
    cfg: float | None = None  # None: the model's default (7 for Stable Diffusion and SD3, 3.5 for Flux, 3 for the demo)
    count: int = 1


@dataclass(frozen=True)
class GenerateResult:
    images: list
    prompt: str  # the cleaned prompt the pipeline saw
    warnings: tuple[str, ...] = field(default_factory=tuple)


def pipeline_class(model_dir: str) -> str:
    """The pipeline class named by ``model_dir/model_index.json``; one-line error if it is not a
    Stable Diffusion (XL), Flux or SD3 diffusers folder."""
    if not os.path.isdir(model_dir):
        raise ModelFolderError(model_dir, "no such folder")
    index = os.path.join(model_dir, "model_index.json")
    if not os.path.isfile(index):
        raise ModelFolderError(model_dir, "not a diffusers model folder (no model_index.json)")
    try:
        with open(index, encoding="utf-8") as fh:
            name = json.load(fh).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelFolderError(model_dir, f"model_index.json unreadable ({type(e).__name__}: {e})") from None
    if name not in PIPELINES:
        raise ModelFolderError(model_dir, f"pipeline {name!r} not supported (want {', '.join(PIPELINES)})")
    return name


class DemoPipeline:
    """The demo model (:mod:`lora_engine.apps.demo`) where generate wants a pipeline: ``root`` is the module
    tree the key map reads, ``render`` draws with the demo's DDIM sampler."""

    default_cfg = 3.0

    def __init__(self, spec: str):
        from .demo.base import load_demo

        self.model, self.path = load_demo(spec)
        self.root = self.model

    def render(self, prompt: str, opts: "GenerateOptions", progress=None) -> list:
        from .demo.diffusion import sample
        from .demo.grid import to_pil
        from .demo.model import RESOLUTION

        for what, v in (("width", opts.width), ("height", opts.height)):
            if v not in (None, RESOLUTION):
                raise LoraEngineError(f"generate: the demo model draws {RESOLUTION}x{RESOLUTION} pixels ({what} {v} "
                                      "asked); leave --width/--height out")
        tick = None if progress is None else (lambda i: progress(i + 1, opts.steps))
        images = sample(self.model, [prompt] * opts.count, opts.seed, opts.steps, opts.cfg, tick, opts.negative)
        return [to_pil(im, DEMO_SCALE) for im in images]


def load_pipeline(model_dir: str):
    """``<pipeline class>.from_pretrained`` on a local folder (fp32), never downloading; the
    demo model (``"demo"`` or a demo base file) as a :class:`DemoPipeline`."""
    from .demo.base import is_demo_base

    if is_demo_base(model_dir):
        return DemoPipeline(model_dir)
    try:
        import diffusers
    except ImportError as e:
        raise LoraEngineError(f"generate needs diffusers ({e.name} missing): pip install 'lora-engine[models]'") \
            from None
    cls = getattr(diffusers, pipeline_class(model_dir))
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if cls.__name__ == "StableDiffusionPipeline" else {}
    try:
        pipe = cls.from_pretrained(model_dir, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFolderError(model_dir, f"cannot load the pipeline ({type(e).__name__}: {first_line(e)})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_root(pipe) -> torch.nn.Module:
    """Container module with the pipeline's ``unet`` or ``transformer`` and ``text_encoder``,
    ``text_encoder_2`` (, ``text_encoder_3``) as children (the diffusers naming the key map knows).
    Shares the pipeline's parameters."""
    root = torch.nn.Module()
    for name in MODEL_PARTS:
        mod = getattr(pipe, name, None)
        if isinstance(mod, torch.nn.Module):
            setattr(root, name, mod)
    return root


def _step_callback(progress: Callable[[int, int], None] | None, total: int):
    if progress is None:
        return None

    def on_step_end(pipe, step, timestep, callback_kwargs):
        progress(step + 1, total)
        return callback_kwargs
    return on_step_end


def run_pipeline(pipe, prompt: str, opts: GenerateOptions, progress=None) -> list:
    """Call the pipeline; image ``i`` draws its noise from ``Generator().manual_seed(seed + i)``."""
    generators = [torch.Generator("cpu").manual_seed(opts.seed + i) for i in range(opts.count)]
    with torch.inference_mode():
        out = pipe(prompt=prompt, negative_prompt=opts.negative or None, num_inference_steps=opts.steps,
                   guidance_scale=opts.cfg, width=opts.width, height=opts.height, num_images_per_prompt=opts.count,
                   generator=generators, output_type="pil",
                   callback_on_step_end=_step_callback(progress, opts.steps))
    return list(out.images)


def _check(opts: GenerateOptions) -> None:
    for what, v in (("steps", opts.steps), ("count", opts.count)):
        if v < 1:
            raise LoraEngineError(f"generate: {what} must be at least 1 (got {v})")
    for what, v in (("width", opts.width), ("height", opts.height)):
        if v is not None and (v < 8 or v % 8):
            raise LoraEngineError(f"generate: {what} must be a positive multiple of 8 (got {v})")


def generate(opts: GenerateOptions, pipe=None, progress: Callable[[int, int], None] | None = None,
             loras=None) -> GenerateResult:
    """Apply the prompt's LoRAs, run the pipeline on the cleaned prompt, restore the weights.

    ``pipe`` reuses a loaded pipeline (default: load ``opts.model_dir``); ``progress(step, total)``
    is called after every denoising step."""
    from ..engine import LoraEngine
    from ..loras import Loras
    from ..syntax.prompt import parse_prompt

    _check(opts)
    pipe = pipe if pipe is not None else load_pipeline(opts.model_dir)
    demo = isinstance(pipe, DemoPipeline)
    kind = None if demo else PIPELINES.get(type(pipe).__name__, "sd")
    if opts.cfg is None:
        opts = replace(opts, cfg=DemoPipeline.default_cfg if demo else DEFAULT_CFG[kind])
    parsed, negative = parse_prompt(opts.prompt), parse_prompt(opts.negative)
    warnings = list(parsed.warnings) + list(negative.warnings)
    if kind == "flux" and negative.cleaned_text.strip():
        warnings.append("negative prompt: Flux.1 has distilled guidance and does not use it")
    if negative.tags:
        warnings.append("negative prompt: LoRA tags there are removed and not applied")
    loras = loras or Loras(opts.lora_dirs)
    warnings += [f"{t.raw}: step scheduling is not supported by generate; applied for all steps"
                 for t in parsed.tags if not t.window.always]
    engine = LoraEngine.for_model(pipe.root if demo else pipeline_root(pipe), mode="merged")
    try:
        warnings += loras.apply(engine, parsed.tags)
        clean = replace(opts, negative=negative.cleaned_text)
        if demo:
            images = pipe.render(parsed.cleaned_text, clean, progress)
        else:
            images = run_pipeline(pipe, parsed.cleaned_text, clean, progress)
    finally:
        engine.restore()
    return GenerateResult(images, parsed.cleaned_text, tuple(warnings))
