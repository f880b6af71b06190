"""On-the-fly overhead layer by layer: the LoRA side path against its FLOP share, ours and diffusers+PEFT.

    python bench/bench_sidepath.py [--stacks 1,3,5] [--rank 32] [--reps 7] [--rounds 3] [--threads 2]
                                   [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--latent 32] [--batch 1]

A whole UNet forward on a shared CPU swings by ±10 % between calls, which drowns a side path of a few
per cent (bench_apply's forward rows). This measures the same quantity where it is paid: the SD1.5 UNet
(real size, fp32, random values) runs one forward at a 32×32 latent and the input of every layer that
kohya's default targets touch is captured; then each layer is timed alone on its captured input,
without and with its LoRA side path back to back (alternating call by call, so the machine's drift
hits both alike): ours = our on-the-fly hooks (``LoraEngine(ONTHEFLY)``) against the layer's own
``forward`` (a direct ``forward`` skips hooks); PEFT = its unfused adapters (``load_lora_into_unet``
+ ``set_adapters``) against the wrapped ``base_layer``. Min of ``reps`` calls, min over ``rounds``
rounds. FLOPs come from ``torch.utils.flop_counter`` on the same calls.

Reported per stack of n rank-R LoRAs: Σ base time of the touched layers, the extra time of ours and of
PEFT in % of it, the LoRA FLOP share of those layers (extra FLOPs ÷ base FLOPs), and the ratio of the
two (the issue's goal: ≤ 1.3). The untouched rest of the forward (attention products, convs, norms)
is the same with and without LoRAs, so the whole-forward ratio is the same number, diluted.

On CUDA (``--device cuda``; defaults there: fp16, 64×64 latent = 512 px, batch 2) one layer call is a few
microseconds of queued kernels, so a timing is ``reps`` back-to-back calls between two synchronisations,
divided by ``reps`` (what a sampler's steady stream of layers sees), min of 3 such blocks per round.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_engine.engine import LoraEngine, Mode, shapes_of  # noqa: E402
from lora_engine.formats import load_lora  # noqa: E402
from lora_engine.keymap import build_keymap  # noqa: E402
from lora_engine.patch import StackEntry  # noqa: E402

from bench.apply_setup import build_model, kohya_targets, make_pipe, peft_load, sync, write_loras  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _addmm_(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _baddbmm_(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


# in-place addmm_ / baddbmm_ (our side path adds its up product into the base output) are not in torch's table
INPLACE_GEMMS = {torch.ops.aten.addmm_: _addmm_, torch.ops.aten.baddbmm_: _baddbmm_}


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=INPLACE_GEMMS) as fc:
        fn()
    return fc.get_total_flops()


def capture_inputs(model, paths: list[str], forward) -> dict[str, torch.Tensor]:
    """The first input each layer at ``paths`` sees during ``forward()`` (one forward of ``model``)."""
    got, handles = {}, []
    for p in paths:
        def hook(module, args, p=p):
            got.setdefault(p, args[0].detach().clone())
        handles.append(model.get_submodule(p).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return got


def unet_forward(unet, side: int = 32, batch: int = 1):
    """One UNet forward on a seeded side×side latent and 77 random text tokens."""
    g = torch.Generator().manual_seed(0)
    dev, dt = unet.device, unet.dtype
    x = torch.randn(batch, unet.config.in_channels, side, side, generator=g).to(dev, dt)
    ehs = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(dev, dt)
    return lambda: unet(x, torch.tensor([500] * batch, device=dev), encoder_hidden_states=ehs)


def _time_calls(fn, x, reps: int, cuda: bool) -> float:
    """min of ``reps`` single calls (CPU), or ``reps`` queued calls ÷ reps (CUDA)."""
    if cuda:
        sync(x.device)
        t = time.perf_counter()
        for _ in range(reps):
            fn(x)
        sync(x.device)
        return (time.perf_counter() - t) / reps
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return best


def paired_times(unet, inputs: dict, reps: int, base_of) -> tuple[dict, dict]:
    """Per layer, the layer without and with its LoRA timed back to back (``reps`` each, alternating in
    blocks of one), so that the machine's drift hits both alike. ``base_of(module)`` is the LoRA-free call:
    ``module.forward`` for ours (a direct ``forward`` skips the hooks), ``module.base_layer`` for PEFT."""
    base, lora = {}, {}
    cuda = unet.device.type == "cuda"
    with torch.no_grad():
        for p, x in inputs.items():
            m = unet.get_submodule(p)
            plain = base_of(m)
            plain(x), m(x)
            inner, outer = (reps, 3) if cuda else (1, reps)
            b = w = float("inf")
            for _ in range(outer):
                b = min(b, _time_calls(plain, x, inner, cuda))
                w = min(w, _time_calls(m, x, inner, cuda))
            base[p], lora[p] = b, w
    return base, lora


def total_flops(unet, inputs: dict) -> int:
    with torch.no_grad():
        return sum(flops(lambda m=unet.get_submodule(p), x=x: m(x)) for p, x in inputs.items())


def measure(unet, inputs, on, off, rounds: int, reps: int, base_of) -> tuple[float, float, float]:
    """(Σ base s, Σ with s, FLOP share) over the layers, min per layer over ``rounds`` rounds of paired
    timings (``paired_times``); the FLOPs with the LoRAs on and off."""
    base, lora = {}, {}
    on()
    for _ in range(rounds):
        b, w = paired_times(unet, inputs, reps, base_of)
        for p in b:
            base[p], lora[p] = min(base.get(p, b[p]), b[p]), min(lora.get(p, w[p]), w[p])
    f_with = total_flops(unet, inputs)
    off()
    f_base = total_flops(unet, inputs)
    return sum(base.values()), sum(lora.values()), (f_with - f_base) / f_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", default="1,3,5")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default fp32 on the CPU, fp16 on CUDA")
    ap.add_argument("--latent", type=int, help="latent side (default 32; CUDA 64)")
    ap.add_argument("--batch", type=int, help="batch (default 1; CUDA 2)")
    ap.add_argument("--model", default="sd1", choices=["sd1", "tiny"], help="tiny: the tests' model (smoke test)")
    args = ap.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    dtype = DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    side, batch = args.latent or (64 if cuda else 32), args.batch or (2 if cuda else 1)
    stacks = [int(s) for s in args.stacks.split(",")]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()

    root = build_model(args.model, dtype, args.device)
    keymap = build_keymap(shapes_of(root))
    targets = kohya_targets(keymap, "sd1")
    folder = tempfile.mkdtemp(prefix="bench_sidepath_")
    try:
        paths = write_loras(folder, targets, max(stacks), args.rank)
        files = [load_lora(p) for p in paths]
        unet_paths = sorted({t.weight_key.rpartition(".")[0][len("unet."):] for t in targets.values()
                             if t.weight_key.startswith("unet.")})
        inputs = capture_inputs(root.unet, unet_paths, unet_forward(root.unet, side, batch))
        where = torch.cuda.get_device_name(args.device) if cuda else f"CPU, torch threads {torch.get_num_threads()}"
        print(f"{len(inputs)} UNet layers touched; {where}; {str(dtype)[6:]}, {side}x{side} latent, batch {batch}; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        rows = {}
        engine = LoraEngine(root, keymap, Mode.ONTHEFLY)
        for n in stacks:
            stack = [StackEntry(f, te=1.0 - 0.2 * i, unet=1.0 - 0.2 * i) for i, f in enumerate(files[:n])]
            rows[n] = [measure(root.unet, inputs, lambda: engine.set_stack(stack), engine.restore,
                               args.rounds, args.reps, lambda m: m.forward), None]
            print(f"  ours n={n}: base {rows[n][0][0]:.3f}s with {rows[n][0][1]:.3f}s share {rows[n][0][2]:.4f}",
                  flush=True)
        engine.restore()
        if not args.no_diffusers:
            pipe = make_pipe("sd1", root)
            for i, p in enumerate(paths):
                peft_load(pipe, p, f"l{i}")
            for n in stacks:
                names = [f"l{i}" for i in range(n)]
                weights = [1.0 - 0.2 * i for i in range(n)]
                rows[n][1] = measure(root.unet, inputs,
                                     lambda: (pipe.enable_lora(), pipe.set_adapters(names, weights)),
                                     pipe.disable_lora, args.rounds, args.reps,
                                     lambda m: getattr(m, "base_layer", m))
                print(f"  diffusers+PEFT n={n}: base {rows[n][1][0]:.3f}s with {rows[n][1][1]:.3f}s", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print("\n| n | Σ base ms (touched layers) | ours +% | PEFT unfused +% | LoRA FLOP share % | ours ÷ share | "
          "PEFT ÷ share |\n|---:|---:|---:|---:|---:|---:|---:|")
    for n, (ours, peft) in rows.items():
        b, w, share = ours
        o = 100 * (w - b) / b
        p = 100 * (peft[1] - peft[0]) / peft[0] if peft else float("nan")
        print(f"| {n} | {1000 * b:.0f} | {o:.1f} | {p:.1f} | {100 * share:.1f} | {o / (100 * share):.2f} | "
              f"{p / (100 * share):.2f} |")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
