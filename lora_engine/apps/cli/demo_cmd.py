"""``lora-engine demo [--out DIR]``: the whole job on the built-in demo model, no download.

Trains a LoRA for a colour the demo base model never saw, applies it with ``<lora:NAME:w>`` at
several weights (negative included) and writes a grid image. Ctrl+C leaves no partial output; the
grid and the LoRA of an earlier run are replaced only with ``--overwrite``.
"""
from __future__ import annotations

import contextlib
import os
import sys

from .tool_common import add_overwrite, add_threads, claim_output


class _Bar:
    def __init__(self, bar):
        self.bar = bar

    def step_to(self, n: int, total: int, loss: float | None = None) -> None:
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(n - self.bar.n)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)


class TqdmUI:
    """One tqdm bar per phase, on stderr."""

    @contextlib.contextmanager
    def bar(self, desc: str, total: int, unit: str):
        from tqdm import tqdm

        with tqdm(total=total, desc=f"{desc:<14}", unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
            yield _Bar(bar)


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"lora-engine demo: --weights {text!r} must be numbers separated by commas") from None


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a LoRA on the built-in demo model and write a weight-sweep grid",
                       description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--weights", default="-1,-0.5,0,0.5,1",
                   help="LoRA weights of the grid columns, e.g. --weights=-1,0,1 (write = before a leading minus)")
    p.add_argument("--steps", type=int, default=None, help="LoRA training steps (default 240)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per image")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (row r uses seed + r)")
    p.add_argument("--base", default=None, help="a demo base model file (default: the shipped one)")
    add_overwrite(p)
    add_threads(p, small_model=lambda args: True)
    p.set_defaults(func=run, cancelled="nothing was written")


def _options(args):
    import dataclasses

    from ..demo.concept import ConceptSettings
    from ..demo.run import DemoOptions

    concept = ConceptSettings() if args.steps is None else dataclasses.replace(ConceptSettings(), steps=args.steps)
    return DemoOptions(out=args.out, weights=_weights(args.weights), seed=args.seed, sample_steps=args.sample_steps,
                       concept=concept, base=args.base)


def run(args) -> int:
    from ..demo.run import GRID_NAME, run_demo

    opts = _options(args)
    for name in (GRID_NAME, opts.lora_name + ".safetensors"):
        claim_output(os.path.join(opts.out, name), args.overwrite)
    res = run_demo(opts, TqdmUI())
    for line in res.warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(f"base model: {res.base}")
    print(f"LoRA:       {res.lora} ({res.lora_steps} steps, final loss {res.final_loss:.4f})")
    print("purple score (mean min(R,B)-G) per weight: "
          + ", ".join(f"{w:g}: {s:+.3f}" for w, s in res.scores.items()))
    print(f"grid:       {res.grid}")
    print(f"done in {res.seconds:.0f} s")
    return 0
