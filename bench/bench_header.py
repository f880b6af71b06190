"""bench_header: what a hostile or oversized safetensors header costs the library scan, before and after.

Writes these files into a temp dir (1-element F32 tensors, so the header is nearly the whole file):

  300k        300,000 entries with LoRA-style names, a ~40 MB header: what one file in a shared folder could
              hold (refused: more entries than any LoRA file has)
  bound-lora  MAX_TENSORS (16,384) entries: 5,461 complete LoRA modules (down, up, alpha) and a lone
              down: the largest file accepted, and the slowest
  bound-junk  MAX_TENSORS entries no adapter uses (refused: not a LoRA)
  deep        an extra entry field nested 50,000 brackets deep (refused)
  values      3,000,000 numbers in an extra entry field (refused)
  sdxl-size   2,958 entries (986 modules), the key count of a full SDXL LoRA: the everyday case

and runs ``lora_engine.library.summary.summarize(path, check_finite=False)`` on each, which is what a library scan
does per new file (header, keys, adapters; no NaN scan). Each measurement runs in a fresh process with one
torch thread, ``--repeat`` times (median seconds; peak RSS growth during the call, VmHWM after a
``/proc/self/clear_refs`` reset, the largest seen; nan where the reset is not possible). ``--baseline REV`` runs the same files with the ``lora_engine`` of git revision REV too (taken
with ``git archive``), in the same session, so the two columns are comparable.

    python bench/bench_header.py [--baseline REV] [--repeat 3] [--cases 300k,sdxl-size]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_engine.formats.safetensors_file import MAX_TENSORS  # noqa: E402  (the bound of this tree)
NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_{}_attn1_to_q"

CHILD = r"""
import gc, json, sys, time
import torch
torch.set_num_threads(1)
try:
    from lora_engine.library.summary import summarize
except ImportError:  # a --baseline revision from before the library/ package
    from lora_engine.diagnose import summarize


def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))


gc.collect()
base = status("VmRSS")
try:  # VmHWM back to the current RSS, so the peak is this call's (not the imports')
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    reset = True
except OSError:
    reset = False
t0 = time.perf_counter()
try:
    s = summarize(sys.argv[1], check_finite=False)
    error, modules = s.error, s.modules
except BaseException as e:  # summarize is meant never to raise; older code did
    error, modules = f"{sys.argv[1]}: raised {type(e).__name__}: {str(e)[:60]}", 0
seconds = time.perf_counter() - t0
growth = status("VmHWM") - base if reset else float("nan")
print(json.dumps({"seconds": seconds, "growth_kb": growth, "error": error, "modules": modules}))
"""


def _entries(names_shapes) -> tuple[bytes, int]:
    parts, off = [], 0
    for name, shape in names_shapes:
        n = 4
        for d in shape:
            n *= d
        parts.append(f'"{name}":{{"dtype":"F32","shape":{json.dumps(shape)},"data_offsets":[{off},{off + n}]}}')
        off += n
    return ("{" + ",".join(parts) + "}").encode(), off


def _write(path: str, header: bytes, data_len: int) -> str:
    header += b" " * (-len(header) % 8)  # padded as the reference writer pads: tensor data 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.write(b"\0" * data_len)
    return path


def make_cases(folder: str, wanted: set[str]) -> dict[str, str]:
    out = {}

    def lora(modules: int):
        for m in range(modules):
            yield from ((NAME.format(m) + ".lora_down.weight", [2, 8]), (NAME.format(m) + ".lora_up.weight", [8, 2]),
                        (NAME.format(m) + ".alpha", []))

    makers = {
        "300k": lambda: _entries((NAME.format(i) + ".lora_down.weight", [1]) for i in range(300_000)),
        "bound-lora": lambda: _entries(list(lora(MAX_TENSORS // 3 + 1))[:MAX_TENSORS]),
        "bound-junk": lambda: _entries((f"t{i:07d}", [1]) for i in range(MAX_TENSORS)),
        "deep": lambda: ((b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + b"[" * 50_000
                          + b"]" * 50_000 + b"}}"), 4),
        "values": lambda: ((b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":['
                            + b",".join([b"0"] * 3_000_000) + b"]}}"), 4),
        "sdxl-size": lambda: _entries(list(lora(986))),
    }
    for name, make in makers.items():
        if name in wanted:
            header, data_len = make()
            out[name] = _write(os.path.join(folder, f"{name}.safetensors"), header, data_len)
    return out


def _baseline_tree(rev: str, folder: str) -> str:
    """``lora_engine`` as of ``rev``, extracted under ``folder``."""
    tar = subprocess.run(["git", "-C", ROOT, "archive", rev, "lora_engine"], capture_output=True, check=True).stdout
    dest = os.path.join(folder, "baseline")
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest)
    return dest


def measure(code_root: str, path: str) -> dict:
    env = dict(os.environ, PYTHONPATH=code_root, OMP_NUM_THREADS="1")
    # cwd: a folder without lora_engine in it ("-c" puts the working directory first on sys.path)
    done = subprocess.run([sys.executable, "-c", CHILD, path], env=env, capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(path))
    if done.returncode != 0:
        return {"seconds": float("nan"), "growth_kb": 0, "error": done.stderr.strip().splitlines()[-1][:100],
                "modules": 0}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", metavar="REV", help="also measure lora_engine at this git revision")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", default="300k,bound-lora,bound-junk,deep,values,sdxl-size")
    args = ap.parse_args()
    wanted = set(args.cases.split(","))
    with tempfile.TemporaryDirectory() as folder:
        files = make_cases(folder, wanted)
        trees = [("this tree", ROOT)] + ([(args.baseline, _baseline_tree(args.baseline, folder))] if args.baseline
                                         else [])
        print("| file | MB | code | median s | peak RSS growth MB | outcome |\n|---|---:|---|---:|---:|---|")
        for name, path in files.items():
            for label, root in trees[::-1]:
                runs = [measure(root, path) for _ in range(args.repeat)]
                r = runs[-1]
                outcome = (r["error"].split(": ", 1)[-1][:70] if r["error"] else f"read, {r['modules']} modules")
                print(f"| {name} | {os.path.getsize(path) / 1e6:.1f} | {label} | "
                      f"{statistics.median(x['seconds'] for x in runs):.2f} | "
                      f"{max(x['growth_kb'] for x in runs) / 1024:.0f} | {outcome} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
