"""``lora-engine demo``: train a LoRA for a new concept on the demo model and show it at several weights.

Phases (each with a progress bar): load the base model (or build it once), write the concept
images, train the LoRA with :mod:`lora_engine.train`, then for every weight render the prompts
with ``<lora:NAME:w>`` tags: the tags are parsed by :func:`lora_engine.syntax.prompt.parse_prompt`,
names resolved by :class:`lora_engine.library.index.LoraLibrary`, files read by
:class:`lora_engine.library.parsed.LoraCache` and applied by :class:`lora_engine.engine.LoraEngine` through
the key map, as a host would. Everything is written to a hidden staging folder beside ``out`` and
moved into ``out`` only at the end; Ctrl+C (or any error) removes the staging folder, so an
interrupted run leaves no partial output.

The effect is measured by the concept score ``mean over pixels of (min(R, B) − G)`` (high for
purple, low for green/yellow), reported per weight.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch

from .concept import ConceptSettings, train_concept, write_concept_images
from .diffusion import sample

DEFAULT_PROMPTS = ("a purple circle", "a purple square", "a purple triangle")
DEFAULT_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_NAME = "demo_grid.png"


@dataclass(frozen=True)
class DemoOptions:
    out: str = "demo_out"
    lora_name: str = "demo_purple"
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    seed: int = 0
    sample_steps: int = 20
    guidance: float = 3.0
    concept: ConceptSettings = field(default_factory=ConceptSettings)
    base: str | None = None  # a demo base file; default: the shipped one


@dataclass(frozen=True)
class DemoResult:
    grid: str
    lora: str
    base: str
    scores: dict[float, float]  # weight -> mean concept score of its column
    lora_steps: int
    final_loss: float
    seconds: float
    warnings: tuple[str, ...] = ()


def concept_score(images: torch.Tensor) -> torch.Tensor:
    """Per image ``(B, 3, H, W)`` in [0, 1]: mean over pixels of ``min(R, B) − G``."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    return (torch.minimum(r, b) - g).mean(dim=(1, 2))


def tagged(prompt: str, name: str, weight: float) -> str:
    return f"{prompt} <lora:{name}:{weight:g}>"


def render_sweep(model, lora_dir: str, opts: DemoOptions, progress=None) -> tuple[list[list[torch.Tensor]], list[str]]:
    """``cells[row][col]``: prompt ``row`` with the LoRA tag at weight ``col``; row r uses seed+r."""
    from ...engine import LoraEngine
    from ...loras import Loras
    from ...syntax.prompt import parse_prompt

    loras, engine = Loras([lora_dir]), LoraEngine.for_model(model, mode="merged")
    columns, warnings = [], []
    try:
        for w in opts.weights:
            parsed = [parse_prompt(tagged(p, opts.lora_name, w)) for p in opts.prompts]
            warnings += [line for p in parsed for line in p.warnings]
            warnings += loras.apply(engine, parsed[0].tags)  # every row of a column carries the same tag
            columns.append(sample(model, [p.cleaned_text for p in parsed], opts.seed, opts.sample_steps,
                                  opts.guidance, callback=progress))
    finally:
        engine.restore()
    cells = [[col[r] for col in columns] for r in range(len(opts.prompts))]
    return cells, sorted(set(warnings))


class QuietUI:
    """Progress sink that shows nothing (library use, tests); the CLI passes tqdm bars."""

    class _Bar:
        def step_to(self, n: int, total: int, loss: float | None = None) -> None:
            pass

    @contextlib.contextmanager
    def bar(self, desc: str, total: int, unit: str):
        yield self._Bar()


def _publish(staging: str, out: str, names: list[str]) -> None:
    os.makedirs(out, exist_ok=True)
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(out, name))


def _train_lora(model, staging: str, opts: DemoOptions, ui):
    """Write the concept images and train the LoRA into ``staging/lora/NAME.safetensors``."""
    c = opts.concept
    data = os.path.join(staging, "concept_images")
    with ui.bar("concept images", c.images, "img") as bar:
        write_concept_images(data, c.images, c.seed)
        bar.step_to(c.images, c.images)
    lora_file = os.path.join(staging, "lora", opts.lora_name + ".safetensors")
    with ui.bar("train LoRA", c.steps, "step") as bar:
        return train_concept(model, data, lora_file, c,
                             progress=lambda p: bar.step_to(p.step, p.total_steps, p.smoothed_loss))


def _sweep(model, lora_dir: str, opts: DemoOptions, ui):
    total = len(opts.weights) * opts.sample_steps
    with ui.bar("sample grid", total, "step") as bar:
        done = [0]

        def tick(_):
            done[0] += 1
            bar.step_to(done[0], total)
        return render_sweep(model, lora_dir, opts, tick)


def run_demo(opts: DemoOptions, ui=None) -> DemoResult:
    """Run every phase; ``ui`` supplies progress bars (see :mod:`lora_engine.apps.cli.demo_cmd`)."""
    from .base import get_base
    from .grid import make_grid

    ui = ui or QuietUI()
    t0 = time.perf_counter()
    out = os.path.abspath(opts.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-", dir=os.path.dirname(out))
    lora_name = opts.lora_name + ".safetensors"
    try:
        with ui.bar("base model", 1, "step") as bar:
            model, base = get_base(opts.base, progress=bar.step_to)
            bar.step_to(1, 1)
        res = _train_lora(model, staging, opts, ui)
        cells, warnings = _sweep(model, os.path.dirname(res.output), opts, ui)
        scores = {w: float(concept_score(torch.stack([row[i] for row in cells])).mean())
                  for i, w in enumerate(opts.weights)}
        title = f"<lora:{opts.lora_name}:w>  (LoRA trained {res.steps} steps on purple shapes)"
        grid = make_grid(cells, list(opts.prompts), [f"{opts.lora_name}:{w:g}" for w in opts.weights], title)
        grid.save(os.path.join(staging, GRID_NAME))
        shutil.move(res.output, os.path.join(staging, lora_name))
        _publish(staging, out, [GRID_NAME, lora_name])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return DemoResult(os.path.join(out, GRID_NAME), os.path.join(out, lora_name), base, scores, res.steps,
                      res.losses[-1] if res.losses else float("nan"), time.perf_counter() - t0, tuple(warnings))
