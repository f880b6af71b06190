"""LoRAs on quantized bases: per-step time on the fly against a per-step dequantize-and-patch baseline.

    python bench/bench_quant.py [--width 3072] [--tokens 256] [--formats fp8,Q8_0,nf4] [--stacks 0,1,4]
                                [--rank 16] [--reps 3] [--threads 2] [--merged]

Model: one Flux single block at full width (``linear1`` 3072→21504, ``linear2`` 15360→3072,
``modulation.lin`` 3072→9216: 141 M weights; ``--width`` scales it down), ComfyUI's native names, random
values, each Linear stored in a format as the hosts hold it (``tests/fixtures/models/quantized.py``):
fp8 e4m3fn cast at each call (ComfyUI ``manual_cast``, A1111's FP8 weight), GGUF Q8_0 blocks dequantized
at each call in torch (ComfyUI-GGUF ``GGMLOps``), bitsandbytes NF4 ``Linear4bit`` (its CPU backend).
A "step" is one call of every layer on ``tokens`` fp32 input rows (the block's attention and norms
are the same in every column and left out). Timed: min of ``reps`` steps; base and ours alternate step
by step (base = the layers' ``forward`` called directly, which skips our hooks).

Columns per format and stack of n rank-R LoRAs (kohya files on all three layers):
- base: the quantized layers alone; ours: with our on-the-fly side path (``LoraEngine(ONTHEFLY)``);
- patch: ComfyUI-GGUF's per-step way (city96/ComfyUI-GGUF ``GGMLLayer.get_weight``): dequantize,
  add every LoRA's full-size ``m·s·up·down`` (``calculate_weight``), then the product; the same for fp8
  and NF4 (what ComfyUI's low-VRAM ``LowVramPatch`` and Forge's online LoRAs do per step);
- ours/base − 1 against the LoRA FLOP share (Σr·(i+o) ÷ i·o), and patch ÷ ours;
- extra: bytes our hooks hold (the concatenated factors) ÷ the LoRA files' tensors.
``--merged``: our merged apply (dequantize, add, re-quantize, exact byte backup) and restore times.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_engine.engine import LoraEngine  # noqa: E402
from lora_engine.formats import load_lora  # noqa: E402
from lora_engine.patch import StackEntry  # noqa: E402
from lora_engine.quant import logical_shape  # noqa: E402

LAYERS = ("single_blocks.0.linear1", "single_blocks.0.linear2", "single_blocks.0.modulation.lin")


def build_block(width: int, seed: int = 0) -> torch.nn.Module:
    """ComfyUI's Flux tree with one single block and no double block at ``width`` (a multiple of 128:
    heads of 128), the three timed Linears random, every other tensor zeros (present so that the key map
    knows the tree as Flux; never run)."""
    from tests.fixtures.models.flux import FLUX_DEV, NativeTree, flux_model, native_state

    cfg = dict(FLUX_DEV, num_layers=0, num_single_layers=1, num_attention_heads=width // 128)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in native_state(flux_model(cfg, meta=True)).items():
        timed = k.rpartition(".")[0] in LAYERS
        fan_in = v.shape[-1] if v.ndim == 2 else 1
        state[k] = torch.randn(v.shape, generator=g) * (0.01 if v.ndim == 1 else fan_in ** -0.5) if timed \
            else torch.zeros(v.shape)
    return NativeTree(state)


def quantize(root: torch.nn.Module, fmt: str) -> torch.nn.Module:
    from tests.fixtures.models import quantized as qz

    if fmt == "fp8":
        return qz.to_fp8(root)
    if fmt == "nf4":
        return qz.to_nf4(root)
    import gguf

    qtype = gguf.GGMLQuantizationType[fmt]
    if qtype == gguf.GGMLQuantizationType.Q8_0:  # gguf's numpy quantizer is slow at this size: the same blocks in torch
        with torch.no_grad():
            for m in list(root.modules()):
                if type(m) is torch.nn.Linear:
                    w = m.weight.detach().reshape(-1, 32)
                    d = (w.abs().amax(1, keepdim=True) / 127).to(torch.float16)
                    q = torch.round(w / d.float().clamp_min(1e-30)).clamp(-127, 127).to(torch.int8)
                    raw = torch.cat([d.view(torch.uint8), q.view(torch.uint8)], 1).reshape(m.weight.shape[0], -1)
                    m.weight = torch.nn.Parameter(qz.GGMLTensor(raw, tensor_type=qtype, tensor_shape=m.weight.shape),
                                                  requires_grad=False)
                    m.__class__ = qz.GGMLLinear
        return root
    return qz.to_gguf(root, qtype)


def write_loras(folder: str, root, n: int, rank: int) -> list[tuple[str, dict]]:
    from safetensors.torch import save_file

    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(100 + k)
        sd = {}
        for name in LAYERS:
            o, i = logical_shape(root.get_submodule(name).weight)
            key = "lora_unet_" + name.replace(".", "_")
            sd[key + ".lora_down.weight"] = torch.randn(rank, i, generator=g) * 0.02
            sd[key + ".lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.02
            sd[key + ".alpha"] = torch.tensor(float(rank))
        path = os.path.join(folder, f"l{k}.safetensors")
        save_file(sd, path)
        out.append((path, sd))
    return out


def dequantized(layer) -> torch.Tensor:
    """The layer's weight as its own forward computes it, fp32."""
    from tests.fixtures.models import quantized as qz

    if isinstance(layer, qz.GGMLLinear):
        return qz.gguf_dequantize(layer.weight, torch.float32)
    if isinstance(layer, qz.CastLinear):
        return layer.weight.to(torch.float32)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def patch_step(root, xs: dict, loras: list[dict]) -> None:
    """ComfyUI-GGUF's per-step path: W = dequant(stored) + Σ m·s·up·down (full size), then the product."""
    for name, x in xs.items():
        layer = root.get_submodule(name)
        w = dequantized(layer)
        key = "lora_unet_" + name.replace(".", "_")
        for sd in loras:
            down, up = sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"]
            w = w + (up @ down) * (float(sd[key + ".alpha"]) / down.shape[0])
        bias = layer.bias
        F.linear(x, w, None if bias is None else torch.Tensor(bias).as_subclass(torch.Tensor).float())


def step(root, xs: dict, hooks: bool = True) -> None:
    """Every layer on its input; ``hooks=False`` calls ``forward`` directly (the base layer alone)."""
    for name, x in xs.items():
        layer = root.get_submodule(name)
        layer(x) if hooks else layer.forward(x)


def best_pair(f, g, reps: int) -> tuple[float, float]:
    """Min times of two functions called alternately (the machine's drift hits both alike)."""
    a = b = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        a = min(a, time.perf_counter() - t)
        t = time.perf_counter()
        g()
        b = min(b, time.perf_counter() - t)
    return a, b


def best(fn, reps: int) -> float:
    out = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def hook_bytes(engine) -> int:
    """Bytes held by our on-the-fly hooks: the concatenated factors of the fused side paths."""
    total = 0
    for hook in engine._patcher.hooks.values():
        for fused, _ in hook.fused_cache.values():
            if fused is not None:
                total += sum(t.numel() * t.element_size() for t in (fused.down, fused.up))
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--formats", default="fp8,Q8_0,nf4")
    ap.add_argument("--stacks", default="0,1,4")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--merged", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    stacks = [int(s) for s in args.stacks.split(",")]
    print(f"# Flux single block at width {args.width}, {args.tokens} tokens, rank {args.rank}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print("| format | n | base s | ours s | patch s | ours/base−1 | LoRA FLOP share | patch/ours | extra/LoRA bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    merged_rows = []
    with tempfile.TemporaryDirectory() as folder:
        for fmt in args.formats.split(","):
            root = quantize(build_block(args.width), fmt)
            g = torch.Generator().manual_seed(1)
            xs = {n: torch.randn(args.tokens, root.get_submodule(n).in_features, generator=g) for n in LAYERS}
            files = write_loras(folder, root, max(stacks), args.rank)
            io = [logical_shape(root.get_submodule(n).weight) for n in LAYERS]
            for n in stacks:
                engine = LoraEngine.for_model(root, mode="onthefly")
                engine.set_stack([StackEntry(load_lora(p)) for p, _ in files[:n]])
                with torch.no_grad():
                    base, ours = best_pair(lambda: step(root, xs, hooks=False), lambda: step(root, xs), args.reps)
                    extra = hook_bytes(engine)
                engine.restore()
                with torch.no_grad():
                    patch = best(lambda: patch_step(root, xs, [sd for _, sd in files[:n]]), args.reps)
                share = sum(n * args.rank * (o + i) for o, i in io) / sum(o * i for o, i in io)
                lora_bytes = sum(t.numel() * t.element_size() for _, sd in files[:n] for k, t in sd.items()
                                 if not k.endswith(".alpha"))
                print(f"| {fmt} | {n} | {base:.3f} | {ours:.3f} | {patch:.3f} | {100 * (ours / base - 1):+.1f} % | "
                      f"{100 * share:.1f} % | {patch / ours:.2f} | "
                      f"{extra / lora_bytes if lora_bytes else 0:.2f} |", flush=True)
            if args.merged and max(stacks) > 0:
                engine = LoraEngine.for_model(root, mode="merged")
                entries = [StackEntry(load_lora(p)) for p, _ in files[:1]]
                t = time.perf_counter()
                engine.set_stack(entries)
                apply = time.perf_counter() - t
                t = time.perf_counter()
                engine.set_stack([StackEntry(e.lora, unet=0.5) for e in entries])
                change = time.perf_counter() - t
                t = time.perf_counter()
                engine.restore()
                merged_rows.append((fmt, apply, change, time.perf_counter() - t))
    if merged_rows:
        print("\n| format | merged apply s (1 LoRA) | change strength s | restore s |\n|---|---|---|---|")
        for fmt, a, c, r in merged_rows:
            print(f"| {fmt} | {a:.3f} | {c:.3f} | {r:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
