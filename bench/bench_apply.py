"""Apply / change-one-weight / restore / on-the-fly overhead / extra RAM of LoRA stacks, ours against
diffusers+PEFT and against the memory-bound limit, in one run on one machine (issue 3).

    python bench/bench_apply.py [--models sd15,sdxl] [--stacks 1,3,5] [--rank 32] [--quick] [--threads 2]
                                [--reps 3] [--no-diffusers] [--no-onthefly] [--no-merged] [--dir D]

Models (real sizes, random values; UNets built on the meta device and filled in their own dtype):
  sd15-fp32, sd15-fp16  SD1.5 UNet + CLIP-L text encoder
  sdxl-fp16             SDXL-base UNet only
  tiny                  the tests' tiny SD1 model (smoke test of this script)
LoRAs: N kohya files of rank R (fp16, safetensors) over kohya's default targets: every Linear / 1x1 conv
inside the UNet's transformer blocks (attn1/attn2 q,k,v,out, ff, proj_in/out) and the text encoder's
self_attn q,k,v,out and mlp fc1/fc2. SD1.5 files use diffusers block names, SDXL files sgm names (as kohya).

Per stack of n LoRAs (weights 1.0, 0.8, 0.6, ... for te and unet):
  apply     ours: LoraEngine(merged).set_stack; diffusers: pipe.set_adapters + pipe.fuse_lora
  change    the last LoRA's weight x0.5. ours: set_stack (touches only slots whose delta changed);
            diffusers: unfuse_lora + set_adapters + fuse_lora (diffusers has no incremental path)
  restore   ours: engine.restore(); diffusers: unfuse_lora. "exact" = blake2b of every touched
            parameter equals its value before apply
  RAM       peak (VmHWM, reset through /proc/self/clear_refs) and steady (VmRSS after gc) growth over
            the apply, against the touched bytes (bytes of the weights the stack writes)
  limit     memory-bound limit = 2 x touched bytes / copy bandwidth (large tensor ``copy_``, r+w counted);
            also shown: the GEMM floor = FLOPs of Σ up·down / measured fp32 GEMM rate of that shape class,
            and (header) the rate of a clone into fresh memory, which bounds a first backup
diffusers+PEFT: a ``StableDiffusion(XL)Pipeline`` object holding our UNet/TE (vae/tokenizer None) and
``pipe.lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` (the two steps of
``load_lora_weights``, with a key rename for transformers>=5's flat CLIPTextModel), ``set_adapters``,
``fuse_lora``, ``unfuse_lora``, ``enable_lora``/``disable_lora``. Ours and PEFT run back to back per stack.
On the fly (fp32 only: CPU fp16 GEMMs run < 1 GFLOP/s here): UNet forward at a 32x32 latent, batch 1,
with on-the-fly hooks (ours) or unfused PEFT adapters (diffusers; base = adapters disabled) minus without
(min of reps, interleaved), and the LoRA FLOP share from torch.utils.flop_counter.FlopCounterMode on the same forward.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_engine.cache import LoraCache  # noqa: E402
from lora_engine.engine import LoraEngine, Mode, shapes_of  # noqa: E402
from lora_engine.keymap import build_keymap  # noqa: E402
from lora_engine.patch import StackEntry  # noqa: E402
from lora_engine.patch.merged import _param, _region  # noqa: E402

from bench.apply_setup import (GiB, MODELS, MiB, Ram, build_model, copy_bandwidth, fingerprint,  # noqa: E402
                                free_ram, fresh_copy_rate, gemm_rate, kohya_targets, make_pipe, model_bytes,
                                n_differ, peft_load, timed, write_loras)


class Bench:
    def __init__(self, name, root, keymap, targets, paths, args, bw, gemm):
        self.name, self.root, self.keymap, self.targets, self.paths = name, root, keymap, targets, paths
        self.args, self.bw, self.gemm = args, bw, gemm
        self.params = {t.weight_key: _param(root, t.weight_key) for t in targets.values()}
        self.touched = sum(_region(p, None).numel() * p.element_size() for p in self.params.values())
        self.merged: dict[int, tuple[dict, dict]] = {}  # n -> (ours, diffusers+PEFT)
        self.otf: dict[int, tuple] = {}  # n -> (t_base, t_ours, t_peft, flop share)
        self.load: tuple[float, float] = (0.0, 0.0)
        firsts = [next((t.weight_key for t in targets.values() if t.component == c), None) for c in ("unet", "te")]
        self.probe = [k for k in firsts if k is not None]  # one UNet and one TE weight: ours vs PEFT values
        self.merged_ref: dict[int, dict] = {}

    def weights(self, n: int) -> list[float]:
        return [1.0 - 0.2 * i for i in range(n)]

    def lora_flops(self, n: int) -> float:
        r = self.args.rank
        return n * sum(2 * t.shape[0] * int(torch.Size(t.shape[1:]).numel()) * r for t in self.targets.values())

    def limit(self) -> float:
        return 2 * self.touched / self.bw

    def ours_merged(self, n: int, files) -> dict:
        before = fingerprint(self.params)
        engine = LoraEngine(self.root, self.keymap, Mode.MERGED)
        stack = [StackEntry(f, te=w, unet=w) for f, w in zip(files[:n], self.weights(n))]
        with Ram() as ram:
            t_apply = timed(lambda: engine.set_stack(stack))
        self.merged_ref[n] = {k: self.params[k].detach().float().clone() for k in self.probe}
        last = stack[-1]
        changed = stack[:-1] + [StackEntry(last.lora, te=last.te * 0.5, unet=last.unet * 0.5)]
        t_change = timed(lambda: engine.set_stack(changed))
        change_bytes = engine.stats.bytes_written
        t_restore = timed(engine.restore)
        return dict(apply=t_apply, change=t_change, change_bytes=change_bytes, restore=t_restore,
                    diff=n_differ(self.params, before), peak=ram.peak, steady=ram.steady)

    def peft_merged(self, pipe, n: int) -> dict:
        names, w = [f"l{i}" for i in range(n)], self.weights(n)
        before = fingerprint(self.params)

        def apply(weights):
            pipe.set_adapters(names, weights)
            pipe.fuse_lora(components=pipe._lora_loadable_modules_present, adapter_names=names)

        with Ram() as ram:
            t_apply = timed(lambda: apply(w))
        agree = max(float((self.params[k].detach().float() - v).abs().max()) for k, v in self.merged_ref[n].items())
        t_change = timed(lambda: (pipe.unfuse_lora(components=pipe._lora_loadable_modules_present),
                                  apply(w[:-1] + [w[-1] * 0.5])))
        t_restore = timed(lambda: pipe.unfuse_lora(components=pipe._lora_loadable_modules_present))
        return dict(apply=t_apply, change=t_change, restore=t_restore, diff=n_differ(self.params, before),
                    peak=ram.peak, steady=ram.steady, agree=agree)

    # ---- on the fly ------------------------------------------------------------------------------
    def forward_fn(self):
        unet = self.root.unet
        cfg, dt = unet.config, unet.dtype
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, cfg.in_channels, 32, 32, generator=g).to(dt)
        ehs = torch.randn(1, 77, cfg.cross_attention_dim, generator=g).to(dt)
        extra = {}
        if cfg.addition_embed_type == "text_time":
            n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            extra["added_cond_kwargs"] = dict(text_embeds=torch.randn(1, n_text, generator=g).to(dt),
                                              time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).to(dt))
        t = torch.tensor([500])

        @torch.no_grad()
        def fwd():
            return unet(x, t, encoder_hidden_states=ehs, **extra).sample
        return fwd

    @staticmethod
    def flops(fn) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        def addmm_(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]

        # in-place addmm_ (our side path adds its up product into the base output) is not in torch's table
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_}) as fc:
            fn()
        return fc.get_total_flops()

    def overhead(self, fn, switch_on, switch_off, reps: int) -> tuple[float, float, float]:
        """(t_base, t_lora, flop share): min of ``reps`` interleaved forwards without / with the LoRAs."""
        switch_off()
        fn()
        base, lora = [], []
        for _ in range(reps):
            switch_off()
            base.append(timed(fn))
            switch_on()
            lora.append(timed(fn))
        f_lora = self.flops(fn)
        switch_off()
        f_base = self.flops(fn)
        return min(base), min(lora), (f_lora - f_base) / f_base


def run_onthefly_ours(b: Bench, files, stacks, reps: int) -> None:
    fwd = b.forward_fn()
    engine = LoraEngine(b.root, b.keymap, Mode.ONTHEFLY)
    for n in stacks:
        stack = [StackEntry(f, te=w, unet=w) for f, w in zip(files[:n], b.weights(n))]
        base, lora, share = b.overhead(fwd, lambda: engine.set_stack(stack), engine.restore, reps)
        b.otf[n] = [base, lora, None, share]
        print(f"  ours on-the-fly n={n}: base {base:.2f}s with {lora:.2f}s share {share:.4f}", flush=True)


def run_onthefly_peft(b: Bench, pipe, stacks, reps: int) -> None:
    fwd = b.forward_fn()
    for n in stacks:
        names = [f"l{i}" for i in range(n)]
        base, lora, _ = b.overhead(fwd, lambda: (pipe.enable_lora(), pipe.set_adapters(names, b.weights(n))),
                                   pipe.disable_lora, reps)
        b.otf[n][2] = (base, lora)
        print(f"  diffusers+PEFT unfused n={n}: base (adapters disabled) {base:.2f}s with {lora:.2f}s", flush=True)


def run_merged(b: Bench, files, pipe, stacks) -> None:
    """Ours then diffusers+PEFT for each stack size, back to back (the machine's load drifts).
    Our engine reaches the weights through PEFT's wrappers (their ``weight`` is the base layer's)."""
    for n in stacks:
        ours = b.ours_merged(n, files)
        print(f"  ours n={n}: " + ", ".join(f"{k} {v:.3g}" for k, v in ours.items()), flush=True)
        peft = b.peft_merged(pipe, n) if pipe is not None else {}
        if peft:
            print(f"  diffusers+PEFT n={n}: " + ", ".join(f"{k} {v:.3g}" for k, v in peft.items()), flush=True)
        b.merged[n] = (ours, peft)


def run_model(name: str, args, bw: float, gemm: float, lora_dirs: dict) -> Bench | None:
    arch, dtype = MODELS[name]
    need, free = 2 * model_bytes(arch, dtype), free_ram()
    if need > free:
        print(f"{name}: SKIPPED, {free / GiB:.1f} GiB free RAM < 2 x model size ({need / GiB:.1f} GiB)")
        return None
    t0 = time.perf_counter()
    root = build_model(arch, dtype)
    keymap = build_keymap(shapes_of(root))
    targets = kohya_targets(keymap, arch)
    if arch not in lora_dirs:
        lora_dirs[arch] = write_loras(tempfile.mkdtemp(prefix=f"bench_apply_{arch}_", dir=args.dir), targets,
                                      max(args.stacks), args.rank)
    b = Bench(name, root, keymap, targets, lora_dirs[arch], args, bw, gemm)
    print(f"{name}: {len(targets)} targets, {b.touched / MiB:.0f} MiB touched; built in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    cache = LoraCache()
    t_load = timed(lambda: [cache.get(p) for p in b.paths])
    files = [cache.get(p) for p in b.paths]
    b.load = (t_load, 0.0)
    otf = dtype == torch.float32 and not args.no_onthefly
    if otf:
        run_onthefly_ours(b, files, args.stacks, args.reps)
    pipe = None
    if not args.no_diffusers:
        pipe = make_pipe(arch, b.root)
        b.load = (t_load, timed(lambda: [peft_load(pipe, p, f"l{i}") for i, p in enumerate(b.paths)]))
    if not args.no_merged:
        run_merged(b, files, pipe, args.stacks)
    if pipe is not None:
        if otf:
            run_onthefly_peft(b, pipe, args.stacks, args.reps)
        pipe.unload_lora_weights()
    b.params_keys = list(b.params)
    b.root = b.params = b.keymap = None
    return b


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def print_tables(benches: list[Bench], bw: float, gemm: float) -> None:
    print(f"\ncopy bandwidth {bw / 1e9:.2f} GB/s (read+write); fp32 GEMM (1280x{benches[0].args.rank})@"
          f"({benches[0].args.rank}x5120) {gemm / 1e9:.1f} GFLOP/s; torch threads {torch.get_num_threads()}")
    print("\n| model | n | touched MiB | limit s | GEMM floor s | ours apply s | ×limit | PEFT apply s | "
          "ours/PEFT | ours change s | changed/touched B | change/apply t | PEFT change s | ours/PEFT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in benches:
        lim = b.limit()
        for n, (o, p) in b.merged.items():
            print(f"| {b.name} | {n} | {b.touched / MiB:.0f} | {lim:.2f} | {b.lora_flops(n) / gemm:.2f} | "
                  f"{o['apply']:.2f} | {o['apply'] / lim:.1f} | {p.get('apply', 0):.2f} | "
                  f"{_ratio(o['apply'], p.get('apply', 0))} | {o['change']:.2f} | "
                  f"{o['change_bytes'] / b.touched:.2f} | {o['change'] / o['apply']:.2f} | "
                  f"{p.get('change', 0):.2f} | {_ratio(o['change'], p.get('change', 0))} |")
    print("\n| model | n | ours restore s | ×limit | exact | PEFT unfuse s | exact (params differing) | "
          "ours RAM peak ×touched | steady ×touched | PEFT fuse RAM peak ×touched | PEFT−ours max abs |")
    print("|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|")
    for b in benches:
        for n, (o, p) in b.merged.items():
            pe = "-" if not p else ("yes" if p["diff"] == 0 else f"no ({p['diff']}/{len(b.params_keys)})")
            print(f"| {b.name} | {n} | {o['restore']:.2f} | {o['restore'] / b.limit():.1f} | "
                  f"{'yes' if o['diff'] == 0 else 'NO %d' % o['diff']} | {p.get('restore', 0):.2f} | {pe} | "
                  f"{o['peak'] / b.touched:.2f} | {o['steady'] / b.touched:.2f} | "
                  f"{p.get('peak', 0) / b.touched:.2f} | {p.get('agree', float('nan')):.2e} |")
    rows = [(b, n, v) for b in benches for n, v in b.otf.items()]
    if rows:
        print("\n| model | n | forward s | ours +% | PEFT unfused +% | LoRA FLOP share % | ours ÷ share | "
              "PEFT ÷ share |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for b, n, (base, ours, peft, share) in rows:
            oo = ours / base - 1
            po = peft[1] / peft[0] - 1 if peft else float("nan")  # against its own base (adapters disabled)
            print(f"| {b.name} | {n} | {base:.2f} | {100 * oo:.1f} | {100 * po:.1f} | {100 * share:.1f} | "
                  f"{oo / share:.2f} | {po / share:.2f} |")
    print("\nload (parse n files): " + "; ".join(f"{b.name}: ours {b.load[0]:.2f}s, diffusers+PEFT {b.load[1]:.2f}s"
                                                for b in benches))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="sd15 (= sd15-fp32,sd15-fp16), sdxl (= sdxl-fp16), tiny, or exact names")
    ap.add_argument("--stacks", help="stack sizes, e.g. 1,3,5")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, help="interleaved forward repeats for on-the-fly (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="sd15-fp32, stack 1, one forward repeat")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-onthefly", action="store_true")
    ap.add_argument("--no-merged", action="store_true", help="only the on-the-fly step overhead")
    ap.add_argument("--dir", help="folder for the LoRA files (default: a temp dir, removed)")
    args = ap.parse_args()
    models = args.models or ("sd15-fp32" if args.quick else "sd15,sdxl")
    alias = {"sd15": ["sd15-fp32", "sd15-fp16"], "sdxl": ["sdxl-fp16"]}
    args.models = [m for x in models.split(",") for m in alias.get(x, [x])]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from sd15, sdxl, {', '.join(MODELS)}")
    args.stacks = [int(x) for x in (args.stacks or ("1" if args.quick else "1,3,5")).split(",")]
    args.reps = args.reps or (1 if args.quick else 3)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    bw, gemm = copy_bandwidth(), gemm_rate(args.rank)
    print(f"copy {bw / 1e9:.2f} GB/s, clone into fresh memory {fresh_copy_rate() / 1e9:.2f} GB/s, "
          f"GEMM {gemm / 1e9:.1f} GFLOP/s, load average {os.getloadavg()[0]:.1f}, "
          f"free RAM {free_ram() / GiB:.1f} GiB", flush=True)
    lora_dirs: dict[str, list[str]] = {}
    benches = []
    try:
        for name in args.models:
            b = run_model(name, args, bw, gemm, lora_dirs)
            if b is not None:
                benches.append(b)
            gc.collect()
    finally:
        if not args.dir:
            for paths in lora_dirs.values():
                shutil.rmtree(os.path.dirname(paths[0]), ignore_errors=True)
    if benches:
        print_tables(benches, bw, gemm)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
