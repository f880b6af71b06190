"""Caption augmentation, in the order of sd-scripts' ``library/train_util.py`` ``BaseDataset.process_caption``.

1. caption dropout: with probability p (or on every n-th epoch) the caption becomes "";
2. else split on ``,`` into tags; the first ``keep_tokens`` are fixed, the rest are shuffled
   (``shuffle``) and each dropped with probability ``tag_dropout``; joined with ", ".
All randomness comes from the ``random.Random`` passed in, so a batch's captions depend
only on (seed, batch index, position) and resume reproduces them.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionOptions:
    shuffle: bool = False
    keep_tokens: int = 0
    dropout: float = 0.0
    dropout_every_n_epochs: int = 0
    tag_dropout: float = 0.0

    @property
    def random(self) -> bool:
        return bool(self.shuffle or self.dropout > 0 or self.dropout_every_n_epochs or self.tag_dropout > 0)


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, epoch: int) -> str:
    if opts.dropout_every_n_epochs and epoch % opts.dropout_every_n_epochs == 0:
        return ""
    if opts.dropout > 0 and rng.random() < opts.dropout:
        return ""
    if not (opts.shuffle or opts.tag_dropout > 0):
        return caption
    tags = split_tags(caption)
    fixed, flexible = tags[: opts.keep_tokens], tags[opts.keep_tokens:]
    if opts.shuffle:
        rng.shuffle(flexible)
    if opts.tag_dropout > 0:
        flexible = [t for t in flexible if rng.random() >= opts.tag_dropout]
    return ", ".join(fixed + flexible)


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: ``{folder: {lower-cased tag: count}}``."""
    return {folder: dict(Counter(t.lower() for c in caps for t in split_tags(c)))
            for folder, caps in captions_by_folder.items()}
