"""A word-level tokenizer over the demo vocabulary (no download, no merges file).

``encode("a red circle") = [BOS, id(a), id(red), id(circle), EOS, PAD, ...]`` padded to
``max_length``, as CLIP's tokenizer lays out a prompt (PAD = EOS as in SD1). Words are the
lower-cased runs of letters; a word outside the vocabulary becomes ``<unk>``; a prompt longer
than ``max_length - 2`` words is cut, the last position always holding EOS.

The vocabulary holds a few words the base model never sees in training (``purple``,
``striped``, ...) so that a LoRA can give them a meaning.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<unk>")
WORDS = ("a", "an", "red", "green", "blue", "yellow", "circle", "square", "triangle",
         "purple", "orange", "pink", "striped", "dotted", "star")
VOCAB = SPECIALS + WORDS
_WORD_RE = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class DemoTokenizer:
    vocab: tuple[str, ...] = VOCAB
    max_length: int = 8

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def pad_id(self) -> int:
        return 1

    @property
    def unk_id(self) -> int:
        return 2

    def words(self, text: str) -> list[str]:
        return _WORD_RE.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        index = {w: i for i, w in enumerate(self.vocab)}
        ids = [index.get(w, self.unk_id) for w in self.words(text)][: self.max_length - 2]
        ids = [self.bos_id, *ids, self.eos_id]
        return ids + [self.pad_id] * (self.max_length - len(ids))

    def unknown(self, text: str) -> list[str]:
        """Words of ``text`` the vocabulary lacks (they would become ``<unk>``)."""
        return [w for w in self.words(text) if w not in self.vocab]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """``(len(texts), max_length)`` int64 ids."""
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)
