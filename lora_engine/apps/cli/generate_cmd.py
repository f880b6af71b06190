"""``lora-engine generate MODEL "PROMPT"``: text-to-image with ``<lora:…>`` tags through a local diffusers
Stable Diffusion (XL), Flux.1, Chroma or SD3 folder (the pipeline named in its ``model_index.json``) or the
built-in demo model (``demo``). Writes PNGs, prints their paths and
every warning."""
from __future__ import annotations

import os
import sys

from .tool_common import add_threads, uses_demo

DEMO_LORA_DIR = "demo_out"  # where `lora-engine demo` writes its LoRA


def register(sub) -> None:
    p = sub.add_parser("generate", help="text-to-image with <lora:...> tags through a diffusers folder or the demo model",
                       description="Text-to-image with <lora:...> tags through a local diffusers Stable Diffusion (XL), "
                       "Flux.1, Chroma or SD3 folder or the built-in demo model; writes PNGs and prints their paths and "
                       "every warning.")
    p.add_argument("model_dir", metavar="MODEL", help="diffusers model folder (has model_index.json), or 'demo' "
                   "(the built-in demo model) or a demo base file")
    p.add_argument("prompt", metavar="PROMPT", help='prompt with A1111 tags, e.g. "a cat <lora:style:0.8>"')
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--lora-dir", action="append", default=[], dest="lora_dirs", metavar="DIR",
                   help=f"folder of LoRA files (repeatable; with the demo model the default is {DEMO_LORA_DIR}, "
                   "where `lora-engine demo` writes)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed; image i uses seed + i (default 0)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default 7; Flux.1: 3.5, its "
                   "distilled guidance; Chroma: 5; 3 for the demo model)")
    p.add_argument("--count", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--out", default="generate_out", help="output folder (default: generate_out; files are never "
                   "replaced: a taken name gets -1, -2, ...)")
    add_threads(p, small_model=uses_demo("model_dir"))
    p.set_defaults(func=run, cancelled="model weights restored, nothing written")


def _save(images, out: str, seed: int) -> list[str]:
    os.makedirs(out, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        n, path = 0, os.path.join(out, f"{seed + i:08d}.png")
        while os.path.exists(path):  # never overwrite an earlier run
            n += 1
            path = os.path.join(out, f"{seed + i:08d}-{n}.png")
        im.save(path)
        paths.append(path)
    return paths


def _lora_dirs(args) -> tuple[tuple[str, ...], list[str]]:
    """The LoRA folders, and a note when the prompt has tags, the model is the demo and its default folder
    is missing."""
    from ...syntax.prompt import parse_prompt

    if args.lora_dirs or not args.small_model(args):
        return tuple(args.lora_dirs), []
    if os.path.isdir(DEMO_LORA_DIR):
        return (DEMO_LORA_DIR,), []
    if not parse_prompt(args.prompt).tags:
        return (), []
    return (), [f"no --lora-dir given and {DEMO_LORA_DIR}/ does not exist: run `lora-engine demo` first to train "
                "demo_purple there, or pass --lora-dir"]


def run(args) -> int:
    from tqdm import tqdm

    from ..generate import GenerateOptions, generate, load_pipeline

    lora_dirs, notes = _lora_dirs(args)
    opts = GenerateOptions(args.model_dir, args.prompt, args.negative, lora_dirs, args.steps, args.width,
                           args.height, args.seed, args.cfg, args.count)
    pipe = load_pipeline(args.model_dir)
    with tqdm(total=opts.steps, desc="generate", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        result = generate(opts, pipe=pipe, progress=lambda n, total: bar.update(n - bar.n))
    paths = _save(result.images, args.out, opts.seed)
    for line in notes + list(result.warnings):
        print(f"warning: {line}")
    for path in paths:
        print(path)
    return 0
