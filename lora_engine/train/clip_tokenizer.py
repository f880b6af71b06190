"""CLIP tokenizers for a single-file checkpoint, found without the hub.

Lookup order: an explicit folder (a CLIP tokenizer, or a diffusers model folder with ``tokenizer/``
and ``tokenizer_2/``); transformers' offline HF cache (``openai/clip-vit-large-patch14``, the laion
OpenCLIP repos); the BPE table that ``open_clip`` ships (``bpe_simple_vocab_16e6.txt.gz``). All of
them are the same 49408-token CLIP BPE; OpenCLIP towers (SD2, SDXL's second encoder) pad with
``"!"`` as diffusers' SD2/SDXL tokenizers do, CLIP-L pads with ``<|endoftext|>``.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile

from ..errors import TrainingError

CACHE_NAMES = {"clip": ("openai/clip-vit-large-patch14",),
               "openclip": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
                            "openai/clip-vit-large-patch14")}
PAD = {"clip": "<|endoftext|>", "openclip": "!"}
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_bpe_vocab(bpe_gz: str, folder: str) -> tuple[str, str]:
    """``vocab.json`` + ``merges.txt`` (the Hugging Face CLIP tokenizer files) in ``folder`` from an
    open_clip-style gzipped BPE merges file (vocab built as open_clip builds it: byte characters, the
    same with ``</w>``, the merges, then the two special tokens)."""
    try:
        with gzip.open(bpe_gz, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise TrainingError(f"{bpe_gz}: cannot read the CLIP BPE table ({e})") from None
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1] if m.strip()]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as fh:
        json.dump({t: i for i, t in enumerate(vocab)}, fh)
    with open(merges_file, "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))
    return vocab_file, merges_file


def bpe_tokenizer(bpe_gz: str, pad_token: str, max_length: int = MAX_LENGTH):
    """A ``CLIPTokenizer`` from an open_clip-style gzipped BPE merges file (``write_bpe_vocab``)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_bpe_vocab(bpe_gz, tmp)
        return CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=max_length)


TOKENIZER_FILES = ("vocab.json", "tokenizer.json")
CLIP_VOCAB = 49408


def _from_folder(folder: str, n: int) -> list:
    from transformers import AutoTokenizer

    subs = [os.path.join(folder, "tokenizer"), os.path.join(folder, "tokenizer_2")]
    if os.path.isdir(subs[0]):
        paths = [subs[0], subs[1] if n > 1 and os.path.isdir(subs[1]) else subs[0]][:n]
    else:
        paths = [folder] * n
    for p in paths:  # transformers 5 builds an empty tokenizer from a folder without files instead of failing
        if not any(os.path.isfile(os.path.join(p, f)) for f in TOKENIZER_FILES):
            raise TrainingError(f"{p}: not a CLIP tokenizer folder (no vocab.json or tokenizer.json)")
    try:
        return [AutoTokenizer.from_pretrained(p, local_files_only=True) for p in paths]
    except (OSError, ValueError, TypeError) as e:
        raise TrainingError(f"{folder}: not a CLIP tokenizer folder ({str(e).splitlines()[0]})") from None


def _from_cache(kind: str):
    from transformers import CLIPTokenizer

    for name in CACHE_NAMES[kind]:
        try:
            tok = CLIPTokenizer.from_pretrained(name, local_files_only=True, pad_token=PAD[kind])
        except Exception:  # noqa: BLE001 - not cached (OSError/ValueError, varies by transformers version)
            continue
        if len(tok) == CLIP_VOCAB:  # transformers 5 returns an empty tokenizer when nothing is cached
            return tok
    return None


def _open_clip_bpe() -> str | None:
    try:
        import open_clip
    except Exception:  # noqa: BLE001 - not installed or broken install: the lookup just moves on
        return None
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    return path if os.path.isfile(path) else None


def clip_tokenizers(kinds: list[str], folder: str | os.PathLike | None = None, model: str = "") -> list:
    """One tokenizer per text encoder (``kinds``: ``"clip"`` or ``"openclip"`` each), in lookup order."""
    if folder is not None:
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise TrainingError(f"{folder}: tokenizer folder does not exist")
        return _from_folder(folder, len(kinds))
    found = [_from_cache(k) for k in kinds]
    if all(t is not None for t in found):
        return found
    bpe = _open_clip_bpe()
    if bpe is not None:
        return [t if t is not None else bpe_tokenizer(bpe, PAD[k]) for t, k in zip(found, kinds)]
    raise TrainingError(
        f"{model or 'checkpoint'}: no CLIP tokenizer available offline; give --tokenizer FOLDER (a CLIP tokenizer "
        "or a diffusers model folder), or put openai/clip-vit-large-patch14 in the Hugging Face cache, "
        "or install open_clip_torch (its bundled BPE table is used)")
