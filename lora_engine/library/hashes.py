"""File hashes used to identify LoRAs (A1111 ``modules/hashes.py`` ``addnet_hash_safetensors``; sd-scripts
``library/train_util.py`` ``precalculate_safetensors_hashes``).

- ``sha256``: of the whole file (changes with any metadata edit; Civitai "AutoV2" = first 10 hex).
- ``addnet`` (= kohya's ``sshs_model_hash``): sha256 of the bytes after the safetensors
  header, ``file[8 + N:]`` with N the little-endian u64 at offset 0, i.e. the tensor data
  only, so it survives metadata edits. For non-safetensors files it is the whole-file sha256.
- ``short``: A1111's ``Lora hashes`` shorthash = ``sshs_model_hash`` metadata[:12] when the
  file carries it (LyCORIS writes ``0x`` + its own digest there, which A1111 shows as is),
  else ``addnet[:12]``. Deviation: the digest of no bytes, which ai-toolkit wrote into every
  file (ostris/ai-toolkit#130), is ignored in favour of the computed hash.
- ``legacy``: the old AddNet/A1111 model hash = first 8 hex of sha256(file[0x100000:0x110000])
  (``e3b0c442`` for files under 1 MiB: the hash of no bytes).

All three digests come from one sequential read of the file.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Callable

from ..errors import LoraFileError

CHUNK = 1 << 20
LEGACY_BEGIN, LEGACY_END = 0x100000, 0x110000


@dataclass(frozen=True)
class FileHashes:
    sha256: str
    addnet: str
    legacy: str


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def bogus_metadata_hash(metadata: dict[str, str] | None) -> bool:
    """True when ``sshs_model_hash`` is the digest of no bytes, which some trainers (ai-toolkit)
    wrote into every file: trusting it would give unrelated LoRAs one shared short hash."""
    return (metadata or {}).get("sshs_model_hash", "").strip().lower() in (EMPTY_SHA256, "0x" + EMPTY_SHA256)


def short_hash(addnet: str | None, metadata: dict[str, str] | None = None) -> str | None:
    """A1111's 12-character shorthash: ``sshs_model_hash`` metadata first (unless bogus), else
    the addnet hash."""
    meta_hash = (metadata or {}).get("sshs_model_hash")
    if meta_hash and not bogus_metadata_hash(metadata):
        return meta_hash[:12]
    return addnet[:12] if addnet else None


def _data_offset(path: str, fh, size: int) -> int | None:
    """Where the tensor data starts for a safetensors file, None for other formats."""
    if not path.lower().endswith(".safetensors"):
        return None
    head = fh.read(8)
    fh.seek(0)
    if len(head) < 8:
        raise LoraFileError(path, f"truncated: {size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
        raise LoraFileError(path, f"not a valid safetensors file: header claims more bytes than the file's {size}")
    return 8 + n


def hash_file(path: str | os.PathLike, progress: Callable[[int], None] | None = None,
              chunk_size: int = CHUNK) -> FileHashes:
    """Compute :class:`FileHashes` in one pass. ``progress(nbytes)`` is called after each chunk
    (raise from it to cancel). Raises :class:`LoraFileError` on unreadable files."""
    path = os.fspath(path)
    whole, data, legacy = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            start = _data_offset(path, fh, size)
            pos = 0
            while True:
                chunk = fh.read(chunk_size)
                if not chunk:
                    break
                end = pos + len(chunk)
                whole.update(chunk)
                if start is not None and end > start:
                    data.update(chunk[max(0, start - pos):])
                if end > LEGACY_BEGIN and pos < LEGACY_END:
                    legacy.update(chunk[max(0, LEGACY_BEGIN - pos):LEGACY_END - pos])
                pos = end
                if progress is not None:
                    progress(len(chunk))
    except OSError as e:
        raise LoraFileError(path, f"cannot read for hashing: {e.strerror or e}") from None
    sha = whole.hexdigest()
    return FileHashes(sha, data.hexdigest() if start is not None else sha, legacy.hexdigest()[:8])
