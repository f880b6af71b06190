"""From batch index to tensors: latents (cached or encoded), augmented captions, conditioning.

Every random choice of batch ``k`` comes from generators seeded by (seed, k, position), so a
batch is the same whether latents are cached or not and whether the run was resumed:
    flip, caption        random.Random(f"{seed}:item:{k}:{pos}")
    VAE posterior sample torch.Generator(seed_of(seed, "vae", item, flip))
"""
from __future__ import annotations

import hashlib
import random

import torch

from ..errors import DatasetError
from .buckets import load_pixels
from .captions import process_caption
from .host import Cond


def seed_of(*parts) -> int:
    """A 63-bit seed derived from any values (stable across runs and platforms)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchMaker:
    def __init__(self, host, dataset, cfg, cache_text: bool):
        self.host, self.dataset, self.cfg = host, dataset, cfg
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.texts: dict[str, Cond] = {}
        self.cache_latents, self.cache_text = cfg.cache_latents, cache_text

    def latent(self, idx: int, flip: bool) -> torch.Tensor:
        key = (idx, flip)
        hit = self.latents.get(key)
        if hit is not None:
            return hit
        item = self.dataset.items[idx]
        try:
            pixels = load_pixels(item.path, item.bucket)
        except Exception as e:  # PIL error types vary
            raise DatasetError(f"{item.path}: cannot read image ({type(e).__name__}: {e})") from None
        if flip:
            pixels = torch.flip(pixels, dims=[-1])
        g = torch.Generator(device=self.host.device).manual_seed(seed_of(self.cfg.seed, "vae", idx, flip))
        with torch.no_grad():
            lat = self.host.encode_image(pixels[None].to(self.host.device), g).detach()
        if self.cache_latents:
            self.latents[key] = lat
        return lat

    def cache_all(self, progress=None, stop=None) -> None:
        """Encode every image (and its mirror when flip is on) once, before training; ``stop()`` True
        ends it early (cancel)."""
        if not self.cache_latents:
            return
        flips = (False, True) if self.cfg.dataset.flip else (False,)
        n = len(self.dataset.items)
        for idx in range(n):
            if stop is not None and stop():
                return
            for flip in flips:
                self.latent(idx, flip)
            if progress is not None:
                progress(idx + 1, n)

    def text(self, captions: list[str]) -> Cond:
        if not self.cache_text:
            return self.host.encode_text(captions)
        parts = []
        for c in captions:
            hit = self.texts.get(c)
            if hit is None:
                with torch.no_grad():
                    hit = self.texts[c] = self.host.encode_text([c]).detach()
            parts.append(hit)
        return Cond.cat(parts)

    def batch(self, k: int) -> tuple[torch.Tensor, list[str], list[tuple[int, int]]]:
        """(latents (B, C, h, w), captions, bucket sizes (w, h)) of batch ``k`` of the stream."""
        epoch, idxs = self.dataset.batch(k, self.cfg.seed)
        latents, captions, sizes = [], [], []
        for pos, idx in enumerate(idxs):
            rng = random.Random(f"{self.cfg.seed}:item:{k}:{pos}")
            flip = self.cfg.dataset.flip and rng.random() < 0.5
            item = self.dataset.items[idx]
            captions.append(process_caption(item.caption, self.cfg.dataset.captions, rng, epoch))
            latents.append(self.latent(idx, flip))
            sizes.append(item.bucket)
        return torch.cat(latents), captions, sizes
