"""Dense deltas of LoHa, LoKr and LoRA stacks: W = cast(W0 + Σ m·ΔW) for every layer of an SD1.5-shaped
model, ours against ComfyUI's algorithm, on the same tensors in one run.

    python bench/bench_dense_delta.py [--types loha,lokr,lora] [--stacks 1,3] [--dtypes fp32,fp16]
                                      [--rank 16] [--lokr-factor 8] [--reps 3] [--threads 1] [--model sd1|tiny]
    COMFYUI=/path/to/ComfyUI python bench/bench_dense_delta.py ...   # times ComfyUI's own weight_adapter code

Layers: kohya's default targets of SD1.5 (the Linear / 1x1 conv weights inside the UNet's transformer blocks,
CLIP-L's attention and MLP: 264 weights, 1342 MiB in fp32), shapes from the real diffusers/transformers
trees on the meta device; each W0 random in the model's dtype. Per layer and stack entry, random factors
stored in fp16 (as files hold them): LoHa ``hada_w1_a/b``, ``hada_w2_a/b`` of rank R; LoKr ``lokr_w1``
(F x F, full) and ``lokr_w2_a/b`` of rank R (LyCORIS's layout for factor F); LoRA ``lora_down/up`` of rank R;
alpha R/2; strengths 1.0, 0.8, 0.6, ...

Timed per (type, stack, dtype), all layers, min over ``--reps`` interleaved rounds:
  comfyui  ComfyUI's patch of a weight (``ModelPatcher.patch_weight_to_device``): an fp32 copy of W0, each
           stack entry's ``calculate_weight`` on it in turn, then the cast to the model's dtype. With
           ``COMFYUI`` set: ``comfy.weight_adapter``'s LoHa/LoKr/LoRA adapters built by their own ``load``
           from the same tensors. Without: the same algorithm written here from ComfyUI's formulas
           (reference comfyui.md: m1 = w1a@w1b, m2 = w2a@w2b, W += (m·α/r)·(m1⊙m2); W += (m·α/r)·kron(W1, W2);
           W += (m·α/r)·(up@down); factors cast to fp32 first), said so in the output.
  engine   ours, merged mode's arithmetic (``patch.delta.merged_weight``): W0 read from the backup, the sum
           written into the weight (fp32) or into a reused fp32 buffer and rounded into the weight (fp16).
  node     ours inside ComfyUI's flow: the same fp32 copy of W0, our node's ``calculate_weight`` (one patch
           carrying the whole stack), the cast.
The ratio columns are ours ÷ ComfyUI's time (< 1: ours faster). ``max |Δ|`` is the largest difference
between ComfyUI's and our engine's result over all layers (rounding only: the formulas are the same).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
import zlib

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_engine.adapters import build_adapter  # noqa: E402
from lora_engine.engine import shapes_of  # noqa: E402
from lora_engine.formats.keys import SUFFIX_ROLES  # noqa: E402
from lora_engine.keymap import build_keymap  # noqa: E402
from lora_engine.patch.delta import merged_weight  # noqa: E402
from lora_engine.patch.plan import Contribution  # noqa: E402

from bench.apply_setup import MiB, kohya_targets  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---- layers and factors -------------------------------------------------------------------------
def layer_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """{kohya name: weight shape} over kohya's default targets (SD1.5 on the meta device, or the tests' tiny SD1)."""
    from tests.fixtures.models.full_sd import build_full
    from tests.fixtures.models.tiny_sd import TinySD

    m = TinySD.build("sd1") if model == "tiny" else build_full("sd1", "meta")
    root = torch.nn.Module()
    root.unet, root.text_encoder = m.unet, m.text_encoders[0]
    return {name: tuple(t.shape) for name, t in kohya_targets(build_keymap(shapes_of(root)), "sd1").items()}


def _split(dim: int, factor: int) -> tuple[int, int]:
    """(factor, dim / factor) where it divides, else (1, dim): LyCORIS's factorization for a fixed factor."""
    return (factor, dim // factor) if dim % factor == 0 and dim > factor else (1, dim)


def module_tensors(kind: str, shape: tuple[int, ...], rank: int, factor: int, g: torch.Generator) -> dict:
    """The tensors one file holds for one module of ``kind`` on a weight of ``shape`` (fp16, random)."""
    o, i = shape[0], int(torch.Size(shape[1:]).numel())

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.1).half()
    alpha = torch.tensor(rank / 2, dtype=torch.float16)
    if kind == "lora":  # kohya keeps a 1x1 conv's kernel dims on both factors
        kernel = (1, 1) if len(shape) == 4 else ()
        return {"lora_down.weight": rnd(rank, *shape[1:]), "lora_up.weight": rnd(o, rank, *kernel), "alpha": alpha}
    if kind == "loha":
        return {"hada_w1_a": rnd(o, rank), "hada_w1_b": rnd(rank, i), "hada_w2_a": rnd(o, rank),
                "hada_w2_b": rnd(rank, i), "alpha": alpha}
    if kind == "lokr":
        (p, q), (m, _) = _split(o, factor), _split(shape[1], factor)
        return {"lokr_w1": rnd(p, m), "lokr_w2_a": rnd(q, rank), "lokr_w2_b": rnd(rank, i // m), "alpha": alpha}
    raise ValueError(kind)


def roles(tensors: dict) -> dict:
    """A module's tensors by role (``lora_down.weight`` -> ``down``), as the loader hands them to ``build_adapter``."""
    return {SUFFIX_ROLES[suffix]: t for suffix, t in tensors.items()}


class Layer:
    """One weight: W0 (the backup), the live weight, and per stack entry its tensors and our adapter."""

    def __init__(self, name: str, shape, dtype, files: list[dict], strengths: list[float]):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        self.name, self.shape = name, shape
        self.w0 = torch.randn(shape, generator=g).mul_(shape[1] ** -0.5).to(dtype)
        self.w = self.w0.clone()
        self.files, self.strengths = files, strengths
        self.contributions = [Contribution(f"l{k}", name, s, build_adapter(roles(f))[0])
                              for k, (f, s) in enumerate(zip(files, strengths))]


# ---- ComfyUI's algorithm ------------------------------------------------------------------------
def _f32(t):
    return t.to(torch.float32)


def _alpha(files: dict, rank: int) -> float:
    return float(files["alpha"]) / rank


def formula_patch(kind: str, w: torch.Tensor, t: dict, strength: float) -> None:
    """One stack entry added to ComfyUI's fp32 working copy ``w`` in ComfyUI's order of operations:
    the product at full size, then one scalar multiply by strength·α/r, then ``w +=``."""
    if kind == "loha":
        m1 = torch.mm(_f32(t["hada_w1_a"]), _f32(t["hada_w1_b"]))
        diff = m1 * torch.mm(_f32(t["hada_w2_a"]), _f32(t["hada_w2_b"]))
        scale = _alpha(t, t["hada_w1_b"].shape[0])
    elif kind == "lokr":
        diff = torch.kron(_f32(t["lokr_w1"]), torch.mm(_f32(t["lokr_w2_a"]), _f32(t["lokr_w2_b"])))
        scale = _alpha(t, t["lokr_w2_b"].shape[0])
    else:
        diff = torch.mm(_f32(t["lora_up.weight"]).flatten(1), _f32(t["lora_down.weight"]).flatten(1))
        scale = _alpha(t, t["lora_down.weight"].shape[0])
    w += ((strength * scale) * diff.reshape(w.shape)).type(w.dtype)


class ComfyAdapters:
    """ComfyUI's own ``comfy.weight_adapter`` classes, imported from the checkout at ``path``."""

    def __init__(self, path: str):
        sys.path.insert(0, path)
        from comfy.weight_adapter.loha import LoHaAdapter
        from comfy.weight_adapter.lokr import LoKrAdapter
        from comfy.weight_adapter.lora import LoRAAdapter
        self.classes = {"loha": LoHaAdapter, "lokr": LoKrAdapter, "lora": LoRAAdapter}

    def prepare(self, kind: str, layer: Layer) -> None:
        layer.comfy = []
        for t in layer.files:
            sd = {f"{layer.name}.{k}": v for k, v in t.items()}
            a = self.classes[kind].load(layer.name, sd, float(t["alpha"]), None)
            if a is None:
                raise RuntimeError(f"ComfyUI's {kind} adapter did not load {layer.name}")
            layer.comfy.append(a)


def comfy_patch(kind: str, layer: Layer, comfy: ComfyAdapters | None) -> torch.Tensor:
    """ComfyUI's patch of one weight: fp32 copy, the stack's patches in turn, cast to the model dtype."""
    w = layer.w0.to(torch.float32, copy=True)
    if comfy is None:
        for t, s in zip(layer.files, layer.strengths):
            formula_patch(kind, w, t, s)
    else:
        for a, s in zip(layer.comfy, layer.strengths):
            w = a.calculate_weight(w, layer.name, s, 1.0, None, _identity, torch.float32)
    return w.to(layer.w0.dtype)


def _identity(a):
    return a


# ---- ours ---------------------------------------------------------------------------------------
class Scratch:
    """One fp32 buffer reused across layers, as merged mode keeps one per apply."""

    def __init__(self, numel: int):
        self.buf = torch.empty(numel, dtype=torch.float32)

    def like(self, w: torch.Tensor) -> torch.Tensor:
        return self.buf[:w.numel()].view(w.shape)


def engine_patch(layer: Layer, scratch: Scratch) -> torch.Tensor:
    w = layer.w
    out = w if w.dtype == torch.float32 else scratch.like(w)
    new, _ = merged_weight(layer.contributions, layer.w0, out=out)
    if new is not w:
        w.copy_(new)
    return w


def node_patch(layer: Layer) -> torch.Tensor:
    from comfy_nodes.patches import make_adapter

    if not hasattr(layer, "node"):
        layer.node = make_adapter(layer.contributions, "weight", layer.shape)
    w = layer.w0.to(torch.float32, copy=True)
    w = layer.node.calculate_weight(w, layer.name, 1.0, 1.0, None, _identity, torch.float32)
    return w.to(layer.w0.dtype)


# ---- driver -------------------------------------------------------------------------------------
def time_all(fn, layers) -> float:
    t0 = time.perf_counter()
    for layer in layers:
        fn(layer)
    return time.perf_counter() - t0


def run_case(kind: str, n: int, dtype, shapes: dict, args, comfy) -> dict:
    strengths = [1.0 - 0.2 * k for k in range(n)]
    g = torch.Generator().manual_seed(1)
    layers = [Layer(name, shape, dtype, [module_tensors(kind, shape, args.rank, args.lokr_factor, g) for _ in range(n)],
                    strengths) for name, shape in shapes.items()]
    if comfy is not None:
        for layer in layers:
            comfy.prepare(kind, layer)
    scratch = Scratch(max(x.w.numel() for x in layers))
    runs = {"comfyui": lambda x: comfy_patch(kind, x, comfy), "engine": lambda x: engine_patch(x, scratch),
            "node": node_patch}
    diff = 0.0
    for layer in layers:  # warm-up round, and the agreement of the results
        ref = runs["comfyui"](layer).float()
        diff = max(diff, float((runs["engine"](layer).float() - ref).abs().max()))
        diff = max(diff, float((runs["node"](layer).float() - ref).abs().max()))
    best = {k: float("inf") for k in runs}
    for _ in range(args.reps):
        for k, fn in runs.items():
            best[k] = min(best[k], time_all(fn, layers))
    touched = sum(x.w.numel() * x.w.element_size() for x in layers)
    return dict(best, diff=diff, touched=touched, layers=len(layers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="loha,lokr,lora")
    ap.add_argument("--stacks", default="1,3")
    ap.add_argument("--dtypes", default="fp32,fp16")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lokr-factor", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="sd1", choices=["sd1", "tiny"], help="tiny: the tests' model (smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    comfy = ComfyAdapters(os.environ["COMFYUI"]) if os.environ.get("COMFYUI") else None
    where = (f"ComfyUI's own comfy.weight_adapter from {os.environ['COMFYUI']}" if comfy else
             "a baseline written from ComfyUI's formulas (COMFYUI not set: ComfyUI's own code not timed)")
    shapes = layer_shapes(args.model)
    print(f"{len(shapes)} layers; baseline: {where}; torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for dt in args.dtypes.split(","):
        for kind in args.types.split(","):
            for n in (int(s) for s in args.stacks.split(",")):
                r = run_case(kind, n, DTYPES[dt], shapes, args, comfy)
                rows.append((kind, n, dt, r))
                print(f"  {kind} n={n} {dt}: comfyui {r['comfyui']:.3f}s engine {r['engine']:.3f}s "
                      f"node {r['node']:.3f}s", flush=True)
    print(f"\n| type | n | dtype | touched MiB | ComfyUI s | engine s | engine ÷ ComfyUI | node s | node ÷ ComfyUI "
          f"| max abs diff |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, n, dt, r in rows:
        print(f"| {kind} | {n} | {dt} | {r['touched'] / MiB:.0f} | {r['comfyui']:.4f} | {r['engine']:.4f} | "
              f"{r['engine'] / r['comfyui']:.2f} | {r['node']:.4f} | {r['node'] / r['comfyui']:.2f} | "
              f"{r['diff']:.2e} |")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
