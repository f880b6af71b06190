"""Training speed and memory: lora-engine's Trainer vs a plain PEFT-on-diffusers loop.

Both train the same seeded UNet2DConditionModel (frozen CLIP text encoder, cached latents and text
embeddings), the same images, batch size and rank, on the attention projections to_q/k/v/out.0
(what diffusers' ``train_text_to_image_lora.py`` targets), AdamW, grad clipping 1.0, fp32.
Each variant runs in its own process. Reported: steps/s over the timed steps (after warm-up) and
peak memory growth during training (CPU: peak RSS − RSS before the first step; CUDA:
``max_memory_allocated`` − allocated before the first step).

    python bench/bench_train.py [--steps 30] [--device cpu|cuda] [--size small|medium]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {  # UNet width, resolution (pixels; the tiny VAE halves it)
    "small": dict(block_out_channels=(32, 64, 64), resolution=64),
    "medium": dict(block_out_channels=(64, 128, 128), resolution=128),
}
WARMUP = 3


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _unet(size: str, device: str):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=SIZES[size]["resolution"] // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=SIZES[size]["block_out_channels"], norm_num_groups=8, cross_attention_dim=12,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    ).to(device).requires_grad_(False).eval()


def _setup(tmp: str, size: str, device: str):
    import torch

    from tests.train.models import make_dataset, tiny_parts

    parts = tiny_parts(tmp)
    parts.unet = _unet(size, device)
    for name in ("text_encoder", "vae"):
        setattr(parts, name, getattr(parts, name).to(device))
    res = SIZES[size]["resolution"]
    data = make_dataset(os.path.join(tmp, "data"), 8, size=(res, res))
    return parts, data, torch.device(device)


class Meter:
    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.times: list[float] = []

    def start(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            self.base = _rss()

    def tick(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def result(self) -> dict:
        if self.device.type == "cuda":
            peak = self.torch.cuda.max_memory_allocated() - self.base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        t = self.times[WARMUP:]
        return {"steps_per_s": (len(t) - 1) / (t[-1] - t[0]), "peak_mb": peak / 2**20}


def run_engine(tmp, size, device, steps, rank, batch) -> dict:
    from lora_engine.train import Trainer, build_config

    parts, data, dev = _setup(tmp, size, device)
    host = parts.host()
    cfg = build_config(dict(data_dir=data, output=os.path.join(tmp, "e.safetensors"), steps=steps, rank=rank,
                            alpha=rank, unet_targets="attention", resolution=SIZES[size]["resolution"],
                            bucket_step=8, batch_size=batch, unet_lr=1e-4, save_state=False, weight_decay=1e-2))
    meter = Meter(dev)
    trainer = Trainer(host, cfg, progress=lambda p: meter.tick())
    trainer.batches.cache_all()
    for idx, item in enumerate(trainer.dataset.items):  # fill the text cache outside the timed region too
        trainer.batches.text([item.caption])
    trainer.report.seconds_per_step = 0.0  # skip calibration: both variants start cold
    meter.start()
    meter.tick()
    trainer.run()
    return meter.result() | {"trainable": sum(p.numel() for p in trainer.network.parameters())}


def run_peft(tmp, size, device, steps, rank, batch) -> dict:
    """The loop of diffusers' examples/text_to_image/train_text_to_image_lora.py, cached inputs."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    from lora_engine.train.buckets import load_pixels
    from lora_engine.train.dataset import Dataset, DatasetConfig

    parts, data, dev = _setup(tmp, size, device)
    host = parts.host()
    ds = Dataset(data, DatasetConfig(resolution=SIZES[size]["resolution"], bucket_step=8, batch_size=batch))
    with torch.no_grad():
        lat = [host.encode_image(load_pixels(i.path, i.bucket)[None].to(dev), None) for i in ds.items]
        ctx = [host.encode_text([i.caption]).context for i in ds.items]
    unet = parts.unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    sched, g = parts.scheduler, torch.Generator().manual_seed(0)
    meter = Meter(dev)
    meter.start()
    meter.tick()
    for step in range(steps):
        _, idxs = ds.batch(step, 0)
        latents = torch.cat([lat[i] for i in idxs])
        cond = torch.cat([ctx[i] for i in idxs])
        noise = torch.randn(latents.shape, generator=g).to(dev)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=g).to(dev)
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, cond).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        meter.tick()
    return meter.result() | {"trainable": sum(p.numel() for p in params)}


def child(args) -> None:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    fn = run_engine if args.variant == "engine" else run_peft
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(fn(tmp, args.size, args.device, args.steps, args.rank, args.batch)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs per variant; the best is kept")
    ap.add_argument("--variant", choices=("engine", "peft"))
    args = ap.parse_args()
    if args.variant:
        return child(args)
    res: dict[str, dict] = {}
    for _ in range(args.repeat):  # alternate so both see the same machine load
        for variant in ("peft", "engine"):
            cmd = [sys.executable, __file__, "--variant", variant] + [
                f"--{k}={getattr(args, k)}" for k in ("steps", "rank", "batch", "size", "device", "threads")]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            best = res.get(variant)
            res[variant] = r if best is None else {"steps_per_s": max(best["steps_per_s"], r["steps_per_s"]),
                                                   "peak_mb": min(best["peak_mb"], r["peak_mb"]),
                                                   "trainable": r["trainable"]}
    for variant, r in res.items():
        print(f"{variant:6s}: {r['steps_per_s']:.2f} steps/s, peak +{r['peak_mb']:.1f} MB, "
              f"{r['trainable']} trainable params (best of {args.repeat})")
    e, p = res["engine"], res["peft"]
    print(f"ratio engine/peft: speed x{e['steps_per_s'] / p['steps_per_s']:.2f}, "
          f"peak memory x{e['peak_mb'] / max(p['peak_mb'], 1e-9):.2f} "
          f"({args.size}, batch {args.batch}, rank {args.rank}, {args.steps} steps, {args.device})")


if __name__ == "__main__":
    main()
