"""Cost of merged mode's per-slot finiteness check against the apply it guards, in one process.

    python bench/bench_finite_check.py [--models sd15] [--stacks 1,3] [--rank 32] [--reps 3] [--threads 2]

Per model and stack of n LoRAs (the models and LoRAs of ``bench_apply``): ``set_stack`` from nothing
(every touched weight written, the check included), then ``lora_engine.finite.nonfinite`` over every
written weight region (exactly the check merged mode runs after each write), timed back to back,
``--reps`` times, interleaved; the best of each is reported with their ratio. The check is one
reduction in the weight's dtype; the apply reads W₀, runs the GEMMs, adds and casts, so the ratio is
the check's share of an apply. Full ``bench_apply`` runs on a busy machine vary by 2× between runs,
which hides a few percent; this ratio does not depend on the machine's load drifting between runs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_engine.engine import LoraEngine, Mode, shapes_of  # noqa: E402
from lora_engine.finite import nonfinite  # noqa: E402
from lora_engine.keymap import build_keymap  # noqa: E402
from lora_engine.library.parsed import LoraCache  # noqa: E402
from lora_engine.patch import StackEntry  # noqa: E402
from lora_engine.patch.merged import _param  # noqa: E402

from bench.apply_setup import MODELS, MiB, build_model, kohya_targets, timed, write_loras  # noqa: E402


def run(name: str, args, folder: str) -> list[tuple]:
    arch, dtype = MODELS[name]
    root = build_model(arch, dtype)
    keymap = build_keymap(shapes_of(root))
    targets = kohya_targets(keymap, arch)
    paths = write_loras(tempfile.mkdtemp(prefix=f"{arch}_", dir=folder), targets, max(args.stacks), args.rank)
    cache = LoraCache()
    files = [cache.get(p) for p in paths]
    regions = [t.region(_param(root, t.weight_key)) for t in targets.values()]
    touched = sum(r.numel() * r.element_size() for r in regions)
    rows = []
    for n in args.stacks:
        stack = [StackEntry(f, te=1.0 - 0.2 * i, unet=1.0 - 0.2 * i) for i, f in enumerate(files[:n])]
        engine = LoraEngine(root, keymap, Mode.MERGED)
        applies, checks = [], []
        for _ in range(args.reps):
            applies.append(timed(lambda: engine.set_stack(stack)))
            assert engine.stats.slots_written == len(regions) and not engine.warnings()
            checks.append(timed(lambda: [nonfinite(r) for r in regions]))
            engine.restore()
        rows.append((name, n, touched, min(applies), min(checks)))
        print(f"  {name} n={n}: apply {min(applies):.3f}s, check {min(checks):.3f}s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="sd15", help="sd15 (= sd15-fp32,sd15-fp16), sdxl (= sdxl-fp16) or exact names")
    ap.add_argument("--stacks", default="1,3")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    alias = {"sd15": ["sd15-fp32", "sd15-fp16"], "sdxl": ["sdxl-fp16"]}
    models = [m for x in args.models.split(",") for m in alias.get(x, [x])]
    args.stacks = [int(x) for x in args.stacks.split(",")]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"load average {os.getloadavg()[0]:.1f}, torch threads {args.threads}", flush=True)
    folder = tempfile.mkdtemp(prefix="bench_finite_")
    try:
        rows = [row for name in models for row in run(name, args, folder)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("\n| model | n | touched MiB | apply s (check included) | check s | check / apply |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, touched, apply_s, check_s in rows:
        print(f"| {name} | {n} | {touched / MiB:.0f} | {apply_s:.3f} | {check_s:.3f} | {100 * check_s / apply_s:.1f} % |")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
