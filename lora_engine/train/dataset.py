"""Training images: folder scan, validation before any step, buckets and the batch order.

Layout: images (``.png .jpg .jpeg .webp .bmp``) with a caption file of the same stem
(``.txt`` or ``.caption``), directly in the folder and/or in kohya ``N_name`` subfolders
(``10_sks dog``: 10 repeats, "sks dog" is the caption of images without a caption file).

Order: the batch stream is epoch after epoch; epoch e shuffles every bucket's samples
(image × repeats) with ``Random(f"{seed}:order:{e}")``, cuts batches of ``batch_size`` inside a
bucket (the last may be short) and shuffles the batches. Batch ``k`` of the stream is a pure
function of (seed, k), so resuming needs only the number of batches consumed.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field

from PIL import Image

from ..errors import DatasetError
from .buckets import make_buckets, nearest_bucket, upscale_needed
from .captions import CaptionOptions

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTS = (".txt", ".caption")
_REPEATS = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class DatasetConfig:
    resolution: int = 512
    batch_size: int = 1
    enable_buckets: bool = True
    bucket_step: int = 64
    min_bucket: int = 0  # 0: resolution // 2
    max_bucket: int = 0  # 0: resolution * 2
    allow_upscale: bool = False
    flip: bool = False
    captions: CaptionOptions = field(default_factory=CaptionOptions)


@dataclass(frozen=True)
class Item:
    path: str
    caption: str
    folder: str
    repeats: int
    size: tuple[int, int]
    bucket: tuple[int, int]


@dataclass
class DatasetReport:
    folder: str
    images: int = 0
    samples: int = 0  # images × repeats
    folders: dict[str, dict] = field(default_factory=dict)  # name -> {"n_repeats", "img_count"}
    skipped: list[str] = field(default_factory=list)  # "file: why"
    missing_captions: list[str] = field(default_factory=list)
    buckets: dict[tuple[int, int], int] = field(default_factory=dict)  # (w, h) -> samples
    batches_per_epoch: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    epochs: float = 0.0
    seconds_per_step: float | None = None

    def lines(self) -> list[str]:
        out = [f"dataset {self.folder}: {self.images} images, {self.samples} samples with repeats"]
        for name, info in self.folders.items():
            out.append(f"  {name or '.'}: {info['img_count']} images x {info['n_repeats']} repeats")
        for s in self.skipped:
            out.append(f"  skipped {s}")
        if self.missing_captions:
            shown = ", ".join(self.missing_captions[:5]) + (" ..." if len(self.missing_captions) > 5 else "")
            out.append(f"  {len(self.missing_captions)} images without a caption file: {shown}")
        hist = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items()))
        out.append(f"  buckets: {hist}")
        out.append(f"  {self.batches_per_epoch} batches/epoch, {self.steps_per_epoch} steps/epoch, "
                   f"{self.total_steps} steps ({self.epochs:.2f} epochs)")
        if self.seconds_per_step is not None:
            out.append(f"  estimated time: {_duration(self.seconds_per_step * self.total_steps)} "
                       f"({self.seconds_per_step:.3f} s/step measured)")
        return out


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _subsets(root: str) -> list[tuple[str, str, int, str]]:
    """(folder path, folder label, repeats, class tokens) for the root and its N_name subfolders."""
    out = [(root, "", 1, "")]
    for name in sorted(os.listdir(root)):
        m = _REPEATS.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            out.append((os.path.join(root, name), name, max(1, int(m.group(1))), m.group(2).strip()))
    return out


def _caption_of(path: str) -> str | None:
    stem = os.path.splitext(path)[0]
    for ext in CAPTION_EXTS:
        if os.path.isfile(stem + ext):
            with open(stem + ext, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().strip().splitlines()
            return lines[0].strip() if lines else ""
    return None


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image whose pixels decode. ``Image.verify`` is not enough: it checks a PNG's
    chunk checksums, not its compressed data, so a file that passes it can still fail when training reads it."""
    with Image.open(path) as im:
        im.load()
        return im.size


class Dataset:
    """Scanned, validated training set. Raises :class:`DatasetError` with one clear line."""

    def __init__(self, folder: str | os.PathLike, cfg: DatasetConfig):
        self.folder, self.cfg = os.fspath(folder), cfg
        if not os.path.isdir(self.folder):
            raise DatasetError(f"{self.folder}: dataset folder does not exist")
        self.report = DatasetReport(self.folder)
        self.buckets = self._bucket_list()
        self.items = self._scan()
        self.batches_per_epoch = len(self._epoch(0, seed=0))
        self.report.batches_per_epoch = self.batches_per_epoch

    def _bucket_list(self) -> list[tuple[int, int]]:
        c = self.cfg
        if not c.enable_buckets:
            return [(c.resolution, c.resolution)]
        lo = c.min_bucket or max(c.bucket_step, c.resolution // 2 // c.bucket_step * c.bucket_step)
        hi = c.max_bucket or c.resolution * 2
        return make_buckets(c.resolution, c.bucket_step, lo, hi)

    def _scan(self) -> list[Item]:
        rep, items, found = self.report, [], 0
        for path, label, repeats, tokens in _subsets(self.folder):
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTS))
            count = 0
            for name in names:
                full = os.path.join(path, name)
                found += 1
                try:
                    size = _image_size(full)
                except Exception as e:  # PIL raises many types for bad files
                    rep.skipped.append(f"{os.path.join(label, name)}: cannot read image ({type(e).__name__}: {e})")
                    continue
                caption = _caption_of(full)
                if caption is None:
                    rep.missing_captions.append(os.path.join(label, name))
                    caption = tokens
                bucket = nearest_bucket(size, self.buckets)
                if upscale_needed(size, bucket) > 1.0 and not self.cfg.allow_upscale:
                    raise DatasetError(f"{full}: image {size[0]}x{size[1]} is smaller than its bucket "
                                       f"{bucket[0]}x{bucket[1]} (resolution {self.cfg.resolution}); use larger "
                                       "images, a lower resolution, or allow_upscale")
                items.append(Item(full, caption, label, repeats, size, bucket))
                rep.buckets[bucket] = rep.buckets.get(bucket, 0) + repeats
                count += 1
            if names:
                rep.folders[label] = {"n_repeats": repeats, "img_count": count}
        self._check(items, found)
        rep.images, rep.samples = len(items), sum(i.repeats for i in items)
        return items

    def _check(self, items: list[Item], found: int) -> None:
        if found == 0:
            raise DatasetError(f"{self.folder}: no images found (looked for {', '.join(IMAGE_EXTS)} in the folder "
                               "and its N_name subfolders)")
        if not items:
            raise DatasetError(f"{self.folder}: none of the {found} images could be read "
                               f"(first: {self.report.skipped[0]})")
        if not any(i.caption for i in items):
            raise DatasetError(f"{self.folder}: no captions: none of the {len(items)} images has a "
                               f"{'/'.join(CAPTION_EXTS)} file and no N_name folder gives class tokens")

    def _epoch(self, epoch: int, seed: int) -> list[list[int]]:
        rng = random.Random(f"{seed}:order:{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for idx, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).extend([idx] * item.repeats)
        batches = []
        b = self.cfg.batch_size
        for bucket in sorted(by_bucket):
            samples = by_bucket[bucket]
            rng.shuffle(samples)
            batches.extend(samples[i:i + b] for i in range(0, len(samples), b))
        rng.shuffle(batches)
        return batches

    def batch(self, k: int, seed: int) -> tuple[int, list[int]]:
        """(epoch, item indices) of batch ``k`` of the stream."""
        epoch, pos = divmod(k, self.batches_per_epoch)
        if getattr(self, "_cached_epoch", None) != (epoch, seed):
            self._cached_epoch, self._order = (epoch, seed), self._epoch(epoch, seed)
        return epoch, self._order[pos]

    def captions_by_folder(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for item in self.items:
            out.setdefault(item.folder, []).append(item.caption)
        return out
