"""``lora-engine generate MODEL_DIR "PROMPT"``: text-to-image with ``<lora:…>`` tags through a local
diffusers Stable Diffusion (XL) folder. Writes PNGs, prints their paths and every warning."""
from __future__ import annotations

import os
import sys

from ...errors import LoraEngineError


def register(sub) -> None:
    p = sub.add_parser("generate", help="text-to-image with <lora:...> tags through a local diffusers model folder",
                       description="Text-to-image with <lora:...> tags through a local diffusers Stable Diffusion (XL) folder; writes PNGs and prints their paths and every warning.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="diffusers model folder (has model_index.json)")
    p.add_argument("prompt", metavar="PROMPT", help='prompt with A1111 tags, e.g. "a cat <lora:style:0.8>"')
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--lora-dir", action="append", default=[], dest="lora_dirs", metavar="DIR",
                   help="folder of LoRA files (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed; image i uses seed + i (default 0)")
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    p.add_argument("--count", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--out", default="generate_out", help="output folder (default: generate_out)")
    p.set_defaults(func=run)


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


def run(args) -> int:
    from tqdm import tqdm

    from ..generate import GenerateOptions, generate, load_pipeline

    opts = GenerateOptions(args.model_dir, args.prompt, args.negative, tuple(args.lora_dirs), args.steps, args.width,
                           args.height, args.seed, args.cfg, args.count)
    try:
        pipe = load_pipeline(args.model_dir)
        with tqdm(total=opts.steps, desc="generate", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
            result = generate(opts, pipe=pipe, progress=lambda n, total: bar.update(n - bar.n))
        paths = _save(result.images, args.out, opts.seed)
    except LoraEngineError as e:
        print(f"lora-engine generate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lora-engine generate: cancelled; model weights restored, nothing written", file=sys.stderr)
        return 130
    for line in result.warnings:
        print(f"warning: {line}")
    for path in paths:
        print(path)
    return 0
