"""The Generate page's weight-sweep grid, without gradio: rows = LoRAs, columns = weights (like
A1111's X/Y plot with ``<lora:NAME:w>``), every cell from the same seed so only the LoRA differs.

A cell's prompt is the user's prompt plus ``<lora:ROW:w>``; all tags are parsed by
:func:`lora_engine.syntax.prompt.parse_prompt`, turned into stack entries by the UI's
:class:`~lora_engine.loras.Loras` (a LoRA that cannot be used is skipped with one warning) and applied
by a :class:`~lora_engine.engine.LoraEngine` (merged mode; restored after the grid). The model is
anything with ``root`` (the module tree the key map reads) and ``render(text, seed, steps, guidance, callback) -> (3, H, W)`` in [0, 1];
:class:`DemoGenerator` is the built-in demo model.

:class:`GenerateSession` is what the pages hold: it reads every row's file before the model is
loaded, skips an unreadable one with one line, and loads the model on first use.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Callable

from ...errors import LoraEngineError, first_line

DEFAULT_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)


@dataclass(frozen=True)
class SweepSpec:
    prompt: str
    loras: tuple[str, ...]
    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    seed: int = 0
    steps: int = 20
    guidance: float = 3.0


def parse_weights(text: str) -> tuple[float, ...]:
    try:
        ws = tuple(float(v) for v in (text or "").replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise LoraEngineError(f"weights {text!r} must be numbers separated by commas") from None
    if not ws:
        raise LoraEngineError("no weights given (e.g. -1, -0.5, 0, 0.5, 1)")
    return ws


class DemoGenerator:
    """The demo text-to-image model (:mod:`lora_engine.apps.demo`) as a sweep target."""

    def __init__(self, path: str | None = None, progress: Callable[[int, int, float], None] | None = None):
        from ..demo.base import get_base

        self.model, self.path = get_base(path, progress=progress)
        self.root = self.model

    def render(self, text: str, seed: int, steps: int, guidance: float, callback=None):
        from ..demo.diffusion import sample

        return sample(self.model, [text], seed, steps, guidance, callback=callback)[0]


class SweepRunner:
    """Holds the engine of one generator; ``grid`` renders a sweep and restores the weights."""

    def __init__(self, generator, loras):
        """``loras``: the UI's :class:`~lora_engine.loras.Loras` (its folders and parsed-file cache)."""
        from ...engine import LoraEngine

        self.generator, self.loras = generator, loras
        self.engine = LoraEngine.for_model(generator.root, mode="merged")

    def _apply(self, tags) -> list[str]:
        return self.loras.apply(self.engine, tags)

    def usable_rows(self, names) -> tuple[list[str], list[str]]:
        return usable_rows(self.loras, names)

    def cells(self, spec: SweepSpec, progress: Callable[[int, int, str], None] | None = None):
        """``(cells[row][col] tensors, warnings)``."""
        from ...syntax.prompt import parse_prompt

        if not spec.loras:
            raise LoraEngineError("choose at least one LoRA for the sweep")
        names, warnings = self.usable_rows(spec.loras)
        total, done = len(names) * len(spec.weights), 0
        rows = []
        try:
            for name in names:
                row = []
                for w in spec.weights:
                    parsed = parse_prompt(f"{spec.prompt} <lora:{name}:{w:g}>")
                    warnings += list(parsed.warnings) + self._apply(parsed.tags)
                    row.append(self.generator.render(parsed.cleaned_text, spec.seed, spec.steps, spec.guidance))
                    done += 1
                    if progress is not None:
                        progress(done, total, f"{name} at {w:g}")
                rows.append(row)
        finally:
            self.engine.restore()
        return rows, sorted(set(warnings))

    def grid(self, spec: SweepSpec, progress=None):
        """``(PIL grid image, warnings)``: labelled rows (LoRAs) and columns (weights)."""
        from ..demo.grid import make_grid

        cells, warnings = self.cells(spec, progress)
        rows, _ = self.usable_rows(spec.loras)  # the rows cells() rendered (parsed files are cached)
        scale = max(1, 128 // cells[0][0].shape[-1])
        title = f"{spec.prompt}  (seed {spec.seed}, {spec.steps} steps)"
        return make_grid(cells, rows, [f"w = {w:g}" for w in spec.weights], title, scale=scale), warnings


def usable_rows(loras, names) -> tuple[list[str], list[str]]:
    """The row LoRAs that can be read, and one warning line per row that cannot (it is left out);
    :class:`LoraEngineError` when none is left."""
    usable, warnings = [], []
    for name in names:
        try:
            loras.file(name)
            usable.append(name)
        except LoraEngineError as e:
            warnings.append(f"{name}: {first_line(e)}; row left out")
    if not usable:
        raise LoraEngineError("no usable LoRA for the sweep: " + "; ".join(warnings))
    return usable, warnings


class GenerateSession:
    """The configured model (loaded on first use, with progress) and one :class:`SweepRunner`."""

    def __init__(self, ctx):
        self.ctx, self.runner, self._lock = ctx, None, threading.Lock()

    def runner_for(self, progress=None) -> SweepRunner:
        with self._lock:
            if self.runner is None:
                spec = self.ctx.config.model
                if not spec:
                    raise LoraEngineError("no model configured (start the server with --model demo)")
                gen = DemoGenerator(None if spec == "demo" else spec, progress=progress)
                self.runner = SweepRunner(gen, self.ctx.loras)
            return self.runner

    def cells(self, spec: SweepSpec, progress=None, image: bool = True):
        """``(grid image or the cells, lines)``. The rows are read before the model loads: an
        unreadable one is left out with one line, and none left is an error with no model loaded."""
        if not spec.loras:
            raise LoraEngineError("choose at least one LoRA for the sweep")
        rows, left_out = usable_rows(self.ctx.loras, spec.loras)
        runner = self.runner_for(None if progress is None else (lambda d, t, loss: progress(d, t, "base model")))
        with self.ctx.lock:
            out, warnings = (runner.grid if image else runner.cells)(replace(spec, loras=tuple(rows)), progress)
        return out, [f"warning: {w}" for w in left_out + warnings]

    def run(self, prompt, loras, weights, seed, steps, guidance, progress=None):
        """(grid image or None, message)."""
        try:
            spec = SweepSpec(prompt or "", tuple(loras or ()), parse_weights(weights), int(seed), int(steps),
                             float(guidance))
            img, lines = self.cells(spec, progress)
        except LoraEngineError as e:
            return None, f"error: {e}"
        rows = len(spec.loras) - sum(line.endswith("; row left out") for line in lines)
        return img, "\n".join([f"{rows} × {len(spec.weights)} grid"] + lines)
