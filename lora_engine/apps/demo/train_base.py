"""Train the demo base model on the synthetic shapes (the script that made the shipped weights).

    python -m lora_engine.apps.demo.train_base --out lora_engine/apps/demo/assets/demo_base.safetensors

Deterministic for a seed on one thread: the data pool, the noise, the timesteps and the caption
dropout all come from seeded generators. The learning rate is constant after a warm-up and the
saved weights are an EMA of the training weights, so the file written at step ``k`` (every
``--save-every`` steps) equals a run with ``--steps k``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from .dataset import BASE_COLOURS, SHAPES, make_dataset
from .diffusion import noise_loss, train_scheduler
from .model import build_model, save_model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_engine.apps.demo.train_base", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--pool", type=int, default=2400, help="number of distinct training images")
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=200)
    return p


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train(args, progress=None) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _train(args, progress)
    finally:
        torch.set_num_threads(threads)


def _train(args, progress) -> None:
    images, captions = make_dataset(args.pool, BASE_COLOURS, SHAPES, seed=args.seed)
    model = build_model(args.seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sched = train_scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    gen = torch.Generator().manual_seed(args.seed + 1)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, args.pool, (args.batch,), generator=gen)
        loss = noise_loss(model, sched, images[idx], [captions[i] for i in idx.tolist()], gen, args.p_uncond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warm.step()
        _ema_update(ema, model, args.ema if step > args.warmup else 0.0)
        if progress is not None:
            progress(step, loss.item())
        if step % args.save_every == 0 or step == args.steps:
            settings = {k: v for k, v in vars(args).items() if k not in ("out", "steps", "save_every")}
            save_model(ema, args.out, {"steps": step, "settings": settings, "loss": loss.item()})


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = _parser().parse_args(argv)
    bar = tqdm(total=args.steps, desc="train demo base", unit="step")
    t0 = time.time()

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    try:
        train(args, progress)
    except KeyboardInterrupt:
        print("\ninterrupted; the last saved checkpoint (if any) is complete", file=sys.stderr)
        return 130
    bar.close()
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
