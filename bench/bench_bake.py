"""Peak memory and time of ``lora-engine bake`` on a full-size single-file checkpoint, against a
load-everything baseline and a plain file copy, in one run on the same machine.

    python bench/bench_bake.py [--arch sd15|sdxl|flux] [--rank 32] [--double 2 --single 4] [--dir D] [--keep]

Generates (streamed, never whole in RAM) an ldm/sgm-named fp16 checkpoint with the real SD1.5 or SDXL
UNet + text-encoder shapes (models built on the meta device, random values) and a rank-R kohya LoRA on
every attention/ff/proj/text-encoder module (sd-scripts' default targets). ``--arch flux``: a bf16 Flux.1
checkpoint in BFL naming at Flux.1-dev's full width (3072, mlp 12288, joint 4096) and reduced depth
(``--double``/``--single`` blocks), a kohya LoRA on every double/single block Linear (lora_flux's
targets); the peak of a streamed bake depends on the largest tensor, not the depth, so the figure holds
for the 57-block, 23.8 GB Flux.1-dev. Then, each in a fresh
process so ``ru_maxrss`` is its own peak:
  copy      ``shutil.copyfile`` (the memory-bound floor for reading + writing the file)
  bake      ``lora_engine.tools.bake.bake`` (streamed)
  baseline  ``safetensors.torch.load_file`` + the same ``summed_delta`` per target + ``save_file``
Prints wall time and peak RSS of each, and the ratios to the checkpoint size and to ``copy``.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_engine.formats.safetensors_writer import Entry, StreamWriter, atomic_file  # noqa: E402

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")


def _flux_shapes(double: int, single: int) -> dict[str, tuple[int, ...]]:
    from tests.fixtures.models.flux import FLUX_DEV, flux_model, native_state

    model = flux_model(dict(FLUX_DEV, num_layers=double, num_single_layers=single), meta=True)
    return {k: tuple(v.shape) for k, v in native_state(model).items()}


def _meta_shapes(arch: str, double: int = 2, single: int = 4) -> dict[str, tuple[int, ...]]:
    if arch == "flux":
        return _flux_shapes(double, single)
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.fixtures.models.hosts import nested_clip
    from tests.fixtures.models.ldm_view import ldm_unet_view
    from tests.fixtures.models.openclip import OpenCLIPText

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SD15_UNET if arch == "sd15" else SDXL_UNET))
        shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in ldm_unet_view(unet).state_dict().items()}
        te1 = nested_clip(CLIPTextModel(CLIPTextConfig(**CLIP_L)))
        first = "cond_stage_model.transformer." if arch == "sd15" else "conditioner.embedders.0.transformer."
        shapes.update({first + k: tuple(v.shape) for k, v in te1.state_dict().items()})
        if arch == "sdxl":
            c = CLIPTextConfig(**CLIP_G)
            og = OpenCLIPText(c.vocab_size, c.max_position_embeddings, c.hidden_size, c.num_hidden_layers,
                              c.num_attention_heads, c.intermediate_size, c.projection_dim)
            shapes.update({"conditioner.embedders.1.model." + k: tuple(v.shape) for k, v in og.state_dict().items()})
    return shapes


def generate(ckpt: str, lora: str, arch: str, rank: int, double: int = 2, single: int = 4) -> tuple[int, int]:
    from safetensors.torch import save_file

    from lora_engine.keymap import build_keymap

    shapes = _meta_shapes(arch, double, single)
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if arch == "flux" else torch.float16
    entries = [Entry(k, dtype, s) for k, s in shapes.items()]
    with atomic_file(ckpt) as fh:
        w = StreamWriter(fh, entries, {"format": "pt"})
        for e in w.order:
            w.write(e.key, (torch.randn(e.shape, generator=g) * 0.02).to(dtype))
        w.close()
    keymap = build_keymap(shapes)
    wanted = ("attn1", "attn2", "ff_net", "proj_in", "proj_out", "self_attn", "mlp_fc")
    if arch == "flux":
        wanted = ("_double_blocks_", "_single_blocks_")
    sd, seen = {}, set()
    for name in keymap.names():
        t = keymap.lookup(name)
        if (t.weight_key, t.rows) in seen or len(t.shape) not in (2, 4) or not any(x in name for x in wanted):
            continue
        if arch == "flux" and (t.rows is not None or "norm" in name):
            continue  # kohya names the fused native layers (qkv, linear1), not their row slices
        if arch == "sdxl" and any(x in name for x in ("_down_blocks_", "_up_blocks_", "_mid_block_")):
            continue  # SDXL kohya files use sgm names
        seen.add((t.weight_key, t.rows))
        n = int(torch.Size(t.shape[1:]).numel())
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, n, generator=g) * 0.01).half().reshape(rank, *t.shape[1:])
        sd[f"{name}.lora_up.weight"] = (torch.randn(t.shape[0], rank, generator=g) * 0.01).half().reshape(
            t.shape[0], rank, *([1, 1] if len(t.shape) == 4 else []))
        sd[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    save_file(sd, lora)
    largest = max(int(torch.Size(s).numel()) * dtype.itemsize for s in shapes.values())
    print(f"largest tensor {largest / 2**20:.0f} MiB, LoRA file {os.path.getsize(lora) / 2**20:.0f} MiB")
    return os.path.getsize(ckpt), len(seen)


CHILD = {
    "copy": "import shutil,sys; shutil.copyfile(sys.argv[1], sys.argv[3])",
    "bake": ("import sys; from lora_engine.tools.bake import BakeLora, bake; "
             "r = bake(sys.argv[1], [BakeLora(sys.argv[2])], sys.argv[3], overwrite=True); print(r.touched)"),
    "baseline": (
        "import sys, torch; from safetensors.torch import load_file, save_file\n"
        "from lora_engine.formats import load_lora; from lora_engine.keymap import build_keymap\n"
        "from lora_engine.patch import StackEntry, build_plan; from lora_engine.patch.delta import summed_delta\n"
        "sd = load_file(sys.argv[1]); plan = build_plan([StackEntry(load_lora(sys.argv[2]))],"
        " build_keymap({k: tuple(v.shape) for k, v in sd.items()}))\n"
        "for slot, t in plan.targets.items():\n"
        "    w = sd[t.weight_key] if t.rows is None else sd[t.weight_key][t.rows[0]:t.rows[1]]\n"
        "    dw, _ = summed_delta(plan.contributions[slot], w)\n"
        "    w.copy_((w.float() + dw).to(w.dtype))\n"
        "save_file(sd, sys.argv[3])\n"),
}


HWM = ("\nfor line in open('/proc/self/status'):\n"
       "    if line.startswith('VmHWM'): print('HWM', int(line.split()[1]) * 1024)\n")


def run_child(kind: str, ckpt: str, lora: str, out: str) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of one fresh process doing ``kind``. The peak is the child's own
    VmHWM (reset by exec, unlike ru_maxrss, which a forked child inherits from this process)."""
    code = "import sys; sys.path.insert(0, %r)\n" % ROOT + CHILD[kind] + HWM
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, ckpt, lora, out], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed: {proc.stderr.strip().splitlines()[-1:]}")
    hwm = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("HWM"))
    return time.perf_counter() - t0, float(hwm)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sdxl", "flux"])
    ap.add_argument("--double", type=int, default=2, help="flux: double blocks (Flux.1-dev: 19)")
    ap.add_argument("--single", type=int, default=4, help="flux: single blocks (Flux.1-dev: 38)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--dir")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    folder = args.dir or tempfile.mkdtemp(prefix="bench_bake_")
    ckpt, lora = os.path.join(folder, "model.safetensors"), os.path.join(folder, "lora.safetensors")
    try:
        t0 = time.perf_counter()
        size, modules = generate(ckpt, lora, args.arch, args.rank, args.double, args.single)
        what = f"bf16, {args.double} double + {args.single} single blocks" if args.arch == "flux" else "fp16"
        print(f"{args.arch}: checkpoint {size / 2**30:.2f} GiB {what}, LoRA rank {args.rank} on {modules} modules "
              f"(generated in {time.perf_counter() - t0:.0f}s; generator peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")
        kinds = ["copy", "bake"] + ([] if args.skip_baseline else ["baseline"])
        res = {k: run_child(k, ckpt, lora, os.path.join(folder, f"out_{k}.safetensors")) for k in kinds}
        print(f"{'':9s} {'seconds':>8s} {'×copy':>6s} {'peak RSS GiB':>13s} {'RSS/ckpt':>9s}")
        for k, (sec, rss) in res.items():
            print(f"{k:9s} {sec:8.1f} {sec / res['copy'][0]:6.2f} {rss / 2**30:13.2f} {rss / size:9.2f}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
