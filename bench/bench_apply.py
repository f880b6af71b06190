"""Apply / change-one-weight / restore / on-the-fly overhead / extra RAM of LoRA stacks, ours against
diffusers+PEFT and against the memory-bound limit, in one run on one machine.

    python bench/bench_apply.py [--models sd15,sdxl] [--stacks 1,3,5] [--rank 32] [--quick] [--threads 2]
                                [--reps 3] [--no-diffusers] [--no-onthefly] [--no-merged] [--dir D]
                                [--device cpu|cuda] [--backup cpu,same] [--latent 32] [--batch 1]

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
            the apply, against the touched bytes (bytes of the weights the stack writes); on CUDA also
            the device's (caching allocator: max_memory_allocated / memory_allocated growth)
  backup    where our engine keeps the originals: "cpu" (the hosts' default) or "same" (the weight's
            device); on CUDA both are run by default, one row each
  limit     memory-bound limit = 2 x touched bytes / copy bandwidth (large tensor ``copy_``, r+w counted);
            also shown: the GEMM floor = FLOPs of Σ up·down / measured fp32 GEMM rate of that shape class,
            and (header) the rate of a clone into fresh memory, which bounds a first backup
diffusers+PEFT: a ``StableDiffusion(XL)Pipeline`` object holding our UNet/TE (vae/tokenizer None) and
``pipe.lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` (the two steps of
``load_lora_weights``, with a key rename for transformers>=5's flat CLIPTextModel), ``set_adapters``,
``fuse_lora``, ``unfuse_lora``, ``enable_lora``/``disable_lora``. Ours and PEFT run back to back per stack.
On the fly (on the CPU fp32 only: CPU fp16 GEMMs run < 1 GFLOP/s here; on CUDA every dtype): UNet forward
at a ``--latent`` square latent (32 on the CPU, 64 = 512 px on CUDA), batch ``--batch``, with on-the-fly hooks
(ours) or unfused PEFT adapters (diffusers; base = adapters disabled) minus without (min of reps, interleaved),
and the LoRA FLOP share from torch.utils.flop_counter.FlopCounterMode on the same forward.
On CUDA (``--device cuda``) models are built and filled on the GPU, every timing synchronises the device, and
the copy bandwidth / GEMM rate are the GPU's; TF32 stays off (PyTorch's default), so the GEMMs are fp32 as on
the CPU. ``bench/gpu_check.sh`` runs this and bench_sidepath on a GPU machine in one call.
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

from lora_engine.library.parsed import LoraCache  # noqa: E402
from lora_engine.engine import LoraEngine, Mode, shapes_of  # noqa: E402
from lora_engine.keymap import build_keymap  # noqa: E402
from lora_engine.patch import StackEntry  # noqa: E402
from lora_engine.patch.merged import _param  # noqa: E402

from bench.apply_setup import (GiB, MODELS, MiB, Ram, build_model, copy_bandwidth, fingerprint,  # noqa: E402
                                free_memory, free_ram, fresh_copy_rate, gemm_rate, kohya_targets, make_pipe,
                                model_bytes, n_differ, peft_load, timed, write_loras)


class Bench:
    def __init__(self, name, root, keymap, targets, paths, args, bw, gemm):
        self.name, self.root, self.keymap, self.targets, self.paths = name, root, keymap, targets, paths
        self.args, self.bw, self.gemm = args, bw, gemm
        self.device = torch.device(args.device)
        self.params = {t.weight_key: _param(root, t.weight_key) for t in targets.values()}
        self.touched = sum(p.numel() * p.element_size() for p in self.params.values())
        self.merged: dict[int, tuple[dict, dict]] = {}  # n -> ({backup: ours}, diffusers+PEFT)
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

    def ours_merged(self, n: int, files, backup: str) -> dict:
        before = fingerprint(self.params)
        engine = LoraEngine(self.root, self.keymap, Mode.MERGED, backup_device=backup)
        stack = [StackEntry(f, te=w, unet=w) for f, w in zip(files[:n], self.weights(n))]
        dev = self.device
        with Ram(dev) as ram:
            t_apply = timed(lambda: engine.set_stack(stack), dev)
        self.merged_ref[n] = {k: self.params[k].detach().float().clone() for k in self.probe}
        last = stack[-1]
        changed = stack[:-1] + [StackEntry(last.lora, te=last.te * 0.5, unet=last.unet * 0.5)]
        t_change = timed(lambda: engine.set_stack(changed), dev)
        change_bytes = engine.stats.bytes_written
        t_restore = timed(engine.restore, dev)
        return dict(apply=t_apply, change=t_change, change_bytes=change_bytes, restore=t_restore,
                    diff=n_differ(self.params, before), peak=ram.peak, steady=ram.steady,
                    dev_peak=ram.dev_peak, dev_steady=ram.dev_steady)

    def peft_merged(self, pipe, n: int) -> dict:
        names, w = [f"l{i}" for i in range(n)], self.weights(n)
        before = fingerprint(self.params)

        def apply(weights):
            pipe.set_adapters(names, weights)
            pipe.fuse_lora(components=pipe._lora_loadable_modules_present, adapter_names=names)

        dev = self.device
        with Ram(dev) as ram:
            t_apply = timed(lambda: apply(w), dev)
        agree = max(float((self.params[k].detach().float() - v).abs().max()) for k, v in self.merged_ref[n].items())
        t_change = timed(lambda: (pipe.unfuse_lora(components=pipe._lora_loadable_modules_present),
                                  apply(w[:-1] + [w[-1] * 0.5])), dev)
        t_restore = timed(lambda: pipe.unfuse_lora(components=pipe._lora_loadable_modules_present), dev)
        return dict(apply=t_apply, change=t_change, restore=t_restore, diff=n_differ(self.params, before),
                    peak=ram.peak, steady=ram.steady, dev_peak=ram.dev_peak, agree=agree)

    # ---- on the fly ------------------------------------------------------------------------------
    def forward_fn(self):
        unet = self.root.unet
        cfg, dt, dev = unet.config, unet.dtype, self.device
        bs, side = self.args.batch, self.args.latent
        g = torch.Generator().manual_seed(0)
        x = torch.randn(bs, cfg.in_channels, side, side, generator=g).to(dev, dt)
        ehs = torch.randn(bs, 77, cfg.cross_attention_dim, generator=g).to(dev, dt)
        extra = {}
        if cfg.addition_embed_type == "text_time":
            n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).repeat(bs, 1)
            extra["added_cond_kwargs"] = dict(text_embeds=torch.randn(bs, n_text, generator=g).to(dev, dt),
                                              time_ids=time_ids.to(dev, dt))
        t = torch.tensor([500] * bs, device=dev)

        @torch.no_grad()
        def fwd():
            return unet(x, t, encoder_hidden_states=ehs, **extra).sample
        return fwd

    @staticmethod
    def flops(fn) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        from bench.bench_sidepath import INPLACE_GEMMS
        with FlopCounterMode(display=False, custom_mapping=INPLACE_GEMMS) as fc:
            fn()
        return fc.get_total_flops()

    def overhead(self, fn, switch_on, switch_off, reps: int) -> tuple[float, float, float]:
        """(t_base, t_lora, flop share): min of ``reps`` interleaved forwards without / with the LoRAs."""
        dev = self.device
        switch_off()
        fn()
        switch_on()
        fn()  # first call with the hooks prepares their device copies: not part of a step
        base, lora = [], []
        for _ in range(reps):
            switch_off()
            base.append(timed(fn, dev))
            switch_on()
            lora.append(timed(fn, dev))
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
        ours = {}
        for backup in b.args.backup:
            ours[backup] = b.ours_merged(n, files, backup)
            print(f"  ours n={n} backup {backup}: " + ", ".join(f"{k} {v:.3g}" for k, v in ours[backup].items()),
                  flush=True)
        peft = b.peft_merged(pipe, n) if pipe is not None else {}
        if peft:
            print(f"  diffusers+PEFT n={n}: " + ", ".join(f"{k} {v:.3g}" for k, v in peft.items()), flush=True)
        b.merged[n] = (ours, peft)


def run_model(name: str, args, bw: float, gemm: float, lora_dirs: dict) -> Bench | None:
    arch, dtype = MODELS[name]
    need, free = 2 * model_bytes(arch, dtype), free_memory(args.device)
    if need > free:
        print(f"{name}: SKIPPED, {free / GiB:.1f} GiB free memory < 2 x model size ({need / GiB:.1f} GiB)")
        return None
    t0 = time.perf_counter()
    root = build_model(arch, dtype, args.device)
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
    otf = (dtype == torch.float32 or b.device.type != "cpu") and not args.no_onthefly
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


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def print_tables(benches: list[Bench], bw: float, gemm: float) -> None:
    dev = benches[0].device
    cuda = dev.type == "cuda"
    print(f"\n{_device_name(dev)}: copy bandwidth {bw / 1e9:.2f} GB/s (read+write); fp32 GEMM "
          f"(1280x{benches[0].args.rank})@({benches[0].args.rank}x5120) {gemm / 1e9:.1f} GFLOP/s; "
          f"torch threads {torch.get_num_threads()}")
    print("\n| model | n | backup | touched MiB | limit s | GEMM floor s | ours apply s | ×limit | PEFT apply s | "
          "ours/PEFT | ours change s | changed/touched B | change/apply t | PEFT change s | ours/PEFT |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in benches:
        lim = b.limit()
        for n, (ours, p) in b.merged.items():
            for backup, o in ours.items():
                print(f"| {b.name} | {n} | {backup} | {b.touched / MiB:.0f} | {lim:.4f} | {b.lora_flops(n) / gemm:.4f} | "
                      f"{o['apply']:.4f} | {o['apply'] / lim:.1f} | {p.get('apply', 0):.4f} | "
                      f"{_ratio(o['apply'], p.get('apply', 0))} | {o['change']:.4f} | "
                      f"{o['change_bytes'] / b.touched:.2f} | {o['change'] / o['apply']:.2f} | "
                      f"{p.get('change', 0):.4f} | {_ratio(o['change'], p.get('change', 0))} |")
    mem = " | ours VRAM peak ×touched | VRAM steady ×touched | PEFT fuse VRAM peak ×touched" if cuda else ""
    print("\n| model | n | backup | ours restore s | ×limit | exact | PEFT unfuse s | exact (params differing) | "
          "ours RAM peak ×touched | steady ×touched | PEFT fuse RAM peak ×touched" + mem + " | PEFT−ours max abs |")
    print("|---|---:|---|---:|---:|---|---:|---|---:|---:|---:|" + ("---:|" * 3 if cuda else "") + "---:|")
    for b in benches:
        for n, (ours, p) in b.merged.items():
            pe = "-" if not p else ("yes" if p["diff"] == 0 else f"no ({p['diff']}/{len(b.params_keys)})")
            for backup, o in ours.items():
                dm = (f" | {o['dev_peak'] / b.touched:.2f} | {o['dev_steady'] / b.touched:.2f} | "
                      f"{p.get('dev_peak', 0) / b.touched:.2f}") if cuda else ""
                print(f"| {b.name} | {n} | {backup} | {o['restore']:.4f} | {o['restore'] / b.limit():.1f} | "
                      f"{'yes' if o['diff'] == 0 else 'NO %d' % o['diff']} | {p.get('restore', 0):.4f} | {pe} | "
                      f"{o['peak'] / b.touched:.2f} | {o['steady'] / b.touched:.2f} | "
                      f"{p.get('peak', 0) / b.touched:.2f}{dm} | {p.get('agree', float('nan')):.2e} |")
    rows = [(b, n, v) for b in benches for n, v in b.otf.items()]
    if rows:
        a = benches[0].args
        print(f"\nOn the fly: UNet forward, {a.latent}x{a.latent} latent, batch {a.batch}")
        print("\n| model | n | forward s | ours +% | PEFT unfused +% | LoRA FLOP share % | ours ÷ share | "
              "PEFT ÷ share |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for b, n, (base, ours, peft, share) in rows:
            oo = ours / base - 1
            po = peft[1] / peft[0] - 1 if peft else float("nan")  # against its own base (adapters disabled)
            print(f"| {b.name} | {n} | {base:.4f} | {100 * oo:.1f} | {100 * po:.1f} | {100 * share:.1f} | "
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the models live and run")
    ap.add_argument("--backup", help="where our backups live, comma-separated: cpu, same (default: cpu; "
                                     "on CUDA same,cpu)")
    ap.add_argument("--latent", type=int, help="latent side of the on-the-fly forward (default 32; CUDA 64)")
    ap.add_argument("--batch", type=int, help="batch of the on-the-fly forward (default 1; CUDA 2)")
    args = ap.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: this torch sees no CUDA device")
    args.backup = (args.backup or ("same,cpu" if cuda else "cpu")).split(",")
    if any(x not in ("cpu", "same") for x in args.backup):
        ap.error("--backup takes cpu and/or same")
    args.latent = args.latent or (64 if cuda else 32)
    args.batch = args.batch or (2 if cuda else 1)
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
    dev = args.device
    bw, gemm = copy_bandwidth(device=dev), gemm_rate(args.rank, dev)
    print(f"{_device_name(torch.device(dev))}: copy {bw / 1e9:.2f} GB/s, clone into fresh memory "
          f"{fresh_copy_rate(device=dev) / 1e9:.2f} GB/s, GEMM {gemm / 1e9:.1f} GFLOP/s, load average "
          f"{os.getloadavg()[0]:.1f}, free RAM {free_ram() / GiB:.1f} GiB, free on device "
          f"{free_memory(dev) / GiB:.1f} GiB", flush=True)
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
