"""LoRA overhead per generation in a *running* AUTOMATIC1111 WebUI (API on), lora-engine against the
built-in Lora in the same process, on the same model and machine.

Start A1111 with ``--api`` (and this repo in ``extensions/lora-engine``), put two LoRAs of the loaded
checkpoint's family in its Lora folder, then:

    python bench/bench_a1111_live.py --loras NAME1 NAME2 [--url http://127.0.0.1:7860]
                                     [--gens 3] [--steps 4] [--size 256]

For each engine (built-in via the hand-back setting; ours merged / on the fly / automatic) it times
whole ``/sdapi/v1/txt2img`` calls: without LoRA, with a static stack (the same two LoRAs every
generation) and with a stack that changes every generation (the first LoRA's weight alternates).
Overhead = median time with LoRAs - median time without, measured in the same block of calls, so
slow drift of a shared machine cancels. The settings are put back as they were at the end.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request


def call(url: str, path: str, data=None):
    req = urllib.request.Request(url + path, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read() or b"null")


def timed_gen(args, prompt: str) -> float:
    body = dict(prompt=prompt, negative_prompt="", seed=42, steps=args.steps, sampler_name="Euler", cfg_scale=7,
                width=args.size, height=args.size, batch_size=1, save_images=False, send_images=False)
    t = time.perf_counter()
    call(args.url, "/sdapi/v1/txt2img", body)
    return time.perf_counter() - t


ENGINES = (("built-in Lora", dict(lora_engine_handover=True)),
           ("lora-engine merged", dict(lora_engine_handover=False, lora_engine_mode="merged")),
           ("lora-engine on the fly", dict(lora_engine_handover=False, lora_engine_mode="on the fly")),
           ("lora-engine automatic", dict(lora_engine_handover=False, lora_engine_mode="automatic")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--loras", nargs=2, required=True, metavar="NAME")
    ap.add_argument("--gens", type=int, default=3, help="generations per case and engine")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    a, b = args.loras
    base = "a photo of a cat"
    static = f"{base} <lora:{a}:0.8> <lora:{b}:0.6>"
    changing = [f"{base} <lora:{a}:{w}> <lora:{b}:0.6>" for w in (0.7, 0.8)]
    saved = call(args.url, "/sdapi/v1/options")
    saved = {k: saved.get(k) for k in ("lora_engine_handover", "lora_engine_mode")}
    rows = []
    try:
        for label, opts in ENGINES:
            call(args.url, "/sdapi/v1/options", opts)
            timed_gen(args, static)  # warm: files read, caches filled, first merge done
            timed_gen(args, base)
            t_base, t_static, t_change = [], [], []
            for i in range(args.gens):  # interleaved, so drift hits every case alike
                t_base.append(timed_gen(args, base))
                t_static.append(timed_gen(args, static))
                t_change.append(timed_gen(args, changing[i % 2]))
            med = statistics.median
            rows.append((label, med(t_base), med(t_static) - med(t_base), med(t_change) - med(t_base)))
            print(f"{label:24s} base {med(t_base):6.2f} s  static +{rows[-1][2]:6.2f} s  changing +{rows[-1][3]:6.2f} s"
                  f"   (runs: base {['%.2f' % x for x in t_base]}, static {['%.2f' % x for x in t_static]}, "
                  f"changing {['%.2f' % x for x in t_change]})", flush=True)
    finally:
        call(args.url, "/sdapi/v1/options", {k: v for k, v in saved.items() if v is not None})
    ref = rows[0]
    print(f"\n| engine | generation without LoRA | overhead, static stack | overhead, changing stack |")
    print("|---|---|---|---|")
    for label, tb, ts, tc in rows:
        rel = "" if label == ref[0] else f" ({ts / ref[2]:.2f}× built-in)" if ref[2] > 0 else ""
        relc = "" if label == ref[0] else f" ({tc / ref[3]:.2f}× built-in)" if ref[3] > 0 else ""
        print(f"| {label} | {tb:.2f} s | {ts:+.2f} s{rel} | {tc:+.2f} s{relc} |")


if __name__ == "__main__":
    main()
