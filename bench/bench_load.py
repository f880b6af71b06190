"""bench_load: load+parse time of a large LoRA against the raw time to read the same bytes.

Generates a rank-R LoRA (default 128, fp16) on the SDXL key set — the 722 Linear modules inside the SDXL
UNet's attention blocks plus q/k/v/out/fc1/fc2 of both text encoders — with module names and shapes taken
from diffusers' UNet2DConditionModel (SDXL base config) and transformers' CLIP configs instantiated on the
meta device (no weights allocated). Writes it with safetensors.torch.save_file into a temp dir, then, warm
(the file stays in the page cache; dropping it is not possible unprivileged), each measured --repeat times,
median reported:

  raw        open() + read() of the whole file into memory
  load       lora_engine.formats.load_lora (header check, mmap, NaN/Inf scan, key grouping, adapters)
  load+touch load, then sum every tensor of every module (every byte used once more)
  st.load    safetensors.torch.load_file, for reference

    python bench/bench_load.py [--rank 128] [--dtype fp16] [--repeat 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280)
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def sdxl_linear_shapes() -> dict[str, tuple[int, int]]:
    """kohya name -> (out, in) for the SDXL UNet attention linears and both text encoders (meta device)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    shapes: dict[str, tuple[int, int]] = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and ".attentions." in name:
            shapes["lora_unet_" + name.replace(".", "_")] = (m.out_features, m.in_features)
    n_unet = len(shapes)
    for prefix, te in (("lora_te1_", te1), ("lora_te2_", te2)):
        for name, m in te.named_modules():
            if isinstance(m, torch.nn.Linear) and name.endswith(TE_TARGETS):
                path = name if name.startswith("text_model.") else "text_model." + name
                shapes[prefix + path.replace(".", "_")] = (m.out_features, m.in_features)
    print(f"key set: {n_unet} UNet attention linears + {len(shapes) - n_unet} text-encoder linears")
    return shapes


def write_lora(path: str, shapes: dict[str, tuple[int, int]], rank: int, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, (o, i) in shapes.items():
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, i, generator=g) * 0.02).to(dtype)
        sd[f"{name}.lora_up.weight"] = (torch.randn(o, rank, generator=g) * 0.02).to(dtype)
        sd[f"{name}.alpha"] = torch.tensor(float(rank // 2), dtype=dtype)
    save_file(sd, path, metadata={"ss_network_dim": str(rank), "ss_base_model_version": "sdxl_base_v1-0"})


def raw_read(path: str) -> int:
    with open(path, "rb") as fh:
        return len(fh.read())


def load_only(path: str):
    from lora_engine.formats import load_lora

    return load_lora(path)


def load_and_touch(path: str) -> float:
    from lora_engine.formats import _tensors_of, load_lora

    lf = load_lora(path)
    total = 0.0
    for m in lf.modules.values():
        for t in _tensors_of(m.adapter):
            total += float(t.sum(dtype=torch.float32))
    return total


def st_load(path: str) -> int:
    from safetensors.torch import load_file

    return len(load_file(path))


def median_time(fn, path: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared/busy box more threads oversubscribe the"
                         " cores and every torch op slows down 10×; raise it on a quiet machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shapes = sdxl_linear_shapes()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sdxl_r%d.safetensors" % args.rank)
        t0 = time.perf_counter()
        write_lora(path, shapes, args.rank, dtype)
        size = os.path.getsize(path)
        print(f"wrote {len(shapes)} modules, rank {args.rank} {args.dtype}: {size / 2**20:.0f} MiB"
              f" in {time.perf_counter() - t0:.1f} s")
        assert len(load_only(path).modules) == len(shapes)
        raw_read(path)  # warm the page cache
        rows = [("raw read", median_time(raw_read, path, args.repeat)),
                ("load_lora", median_time(load_only, path, args.repeat)),
                ("load_lora + touch", median_time(load_and_touch, path, args.repeat)),
                ("safetensors load_file", median_time(st_load, path, args.repeat))]
    raw = rows[0][1]
    print(f"\n{'measurement':<24}{'median s':>10}{'GiB/s':>8}{'× raw':>8}   (median of {args.repeat}, warm cache,"
          f" torch threads {torch.get_num_threads()})")
    for name, t in rows:
        print(f"{name:<24}{t:>10.3f}{size / 2**30 / t:>8.2f}{t / raw:>8.2f}")
    ratio = rows[2][1] / raw
    print(f"\nload+parse+touch / raw read = {ratio:.2f}×  (goal ≤ 1.5×: {'met' if ratio <= 1.5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
