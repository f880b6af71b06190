"""Scan and resolve a generated folder of LoRA files; compare with a plain os.walk + stat.

    python bench/bench_library.py [--files 2000] [--dir D] [--keep]

Prints, for the same folder in one run: the os.walk+stat baseline, cold library scans
(no cache: every header read and every file hashed, without and with the core's
diagnosis of each file), a warm scan (new library
object, sidecar cache present: what every start-up after the first costs), and the time to
resolve every file by stem, by sub/folder path and by short hash. Ratios are against the
baseline measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora_engine.library.index import LoraLibrary  # noqa: E402


def generate(root: str, n: int) -> None:
    g = torch.Generator().manual_seed(0)
    mod = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    for i in range(n):
        folder = os.path.join(root, f"group{i % 40:02d}", f"sub{i % 3}")
        os.makedirs(folder, exist_ok=True)
        sd = {f"{mod}.lora_down.weight": torch.randn(4, 64, generator=g),
              f"{mod}.lora_up.weight": torch.randn(64, 4, generator=g), f"{mod}.alpha": torch.tensor(4.0)}
        meta = {"ss_output_name": f"alias_{i}", "ss_network_dim": "4"} if i % 2 else None
        # every 10th stem repeats in another folder, so collisions exist as in real libraries
        stem = f"lora_{i // 10 if i % 10 == 0 else i}"
        save_file(sd, os.path.join(folder, stem + ".safetensors"), metadata=meta)
        if i % 5 == 0:
            open(os.path.join(folder, stem + ".json"), "w").write('{"activation text": "x"}')


def walk_stat(root: str) -> int:
    n = 0
    for folder, _dirs, files in os.walk(root, followlinks=True):
        for f in files:
            if f.endswith((".safetensors", ".ckpt", ".pt")):
                os.stat(os.path.join(folder, f))
                n += 1
    return n


def timed(fn, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--dir", help="folder to generate into (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the generated folder")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="lora_bench_")
    cache = os.path.join(root, ".lora-engine-cache.json")
    try:
        t = time.perf_counter()
        generate(root, args.files)
        print(f"generated {args.files} files in {time.perf_counter() - t:.1f}s under {root}")
        base = timed(lambda: walk_stat(root), repeat=5)
        cold_hash = timed(lambda: LoraLibrary([root], use_cache=False, summarize_files=False).scan())
        if os.path.exists(cache):
            os.remove(cache)
        lib = LoraLibrary([root], cache_path=cache)
        cold = timed(lib.scan)
        warm_lib = LoraLibrary([root], cache_path=cache)
        warm = timed(warm_lib.scan)
        warm = min(warm, timed(lambda: LoraLibrary([root], cache_path=cache).scan(), repeat=3))
        entries = warm_lib.entries
        names = [e.key for e in entries] + [e.short_hash for e in entries] + [e.stem for e in entries if e.stem != "x"]

        def resolve_all() -> None:
            for nm in names:
                try:
                    warm_lib.resolve(nm)
                except Exception:  # collisions are expected for the repeated stems
                    pass

        res = timed(resolve_all)
        print(f"os.walk+stat baseline : {base * 1e3:8.1f} ms")
        print(f"cold scan, hash only  : {cold_hash * 1e3:8.1f} ms  ({cold_hash / base:6.1f}x baseline)")
        print(f"cold scan (hash+diag) : {cold * 1e3:8.1f} ms  ({cold / base:6.1f}x baseline)")
        print(f"warm scan (cache)     : {warm * 1e3:8.1f} ms  ({warm / base:6.1f}x baseline)")
        print(f"resolve {len(names)} names  : {res * 1e3:8.1f} ms  ({res / len(names) * 1e6:.1f} us/name)")
        print(f"collisions reported   : {len(warm_lib.collisions())}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
