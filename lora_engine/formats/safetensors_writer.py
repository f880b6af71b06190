"""Write safetensors files atomically, whole or streamed tensor by tensor.

Layout (the same as ``safetensors.torch.save``): 8-byte little-endian header length N, N bytes
of JSON header padded with spaces to a multiple of 8, then the tensors' bytes back to back, in
the order: dtype size descending, then key. That order keeps every tensor aligned to its
element size, and makes the data region of a file we write byte-identical to what
``safetensors.torch.save`` writes for the same tensors (so the addnet/``sshs_model_hash``
of the data region is the same whichever writer produced it).

Atomicity: everything is written to a temporary name in the destination's folder and moved
over the destination with ``os.replace`` only after a successful ``fsync``; any exception
removes the temporary, so a failure never leaves a partial file under the final name. The
temporaries get the modes an ordinary ``open``/``mkdir`` would give (0666/0777 less the umask), not the
owner-only 0600/0700 of ``tempfile``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass

import torch

from ..errors import LoraFileError, OutputExistsError
from .safetensors_file import DTYPES

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor slot of a file to be streamed: key, dtype, shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * torch.empty((), dtype=self.dtype).element_size()


def data_order(entries: list[Entry]) -> list[Entry]:
    """safetensors' own order: larger element size first, then key."""
    return sorted(entries, key=lambda e: (-torch.empty((), dtype=e.dtype).element_size(), e.key))


def header_bytes(entries: list[Entry], metadata: dict[str, str] | None) -> bytes:
    """``len(8) + JSON`` for ``entries`` in the given (data) order, padded to 8 bytes."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for e in entries:
        if e.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {e.key!r}: dtype {e.dtype} cannot be stored in safetensors")
        header[e.key] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (contiguous copy only when needed)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def umask() -> int:
    """The process umask, read without changing it where /proc says it (``os.umask`` sets it to read it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(path: str, folder: bool = False) -> None:
    """Give a ``tempfile`` file/folder the mode ``open``/``mkdir`` would have: 0666/0777 less the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield an open binary file at a temporary name beside ``path``; on success fsync and
    ``os.replace`` it onto ``path``, on any exception delete it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise LoraFileError(path, "output folder does not exist")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial", dir=folder)
    try:
        ordinary_mode(tmp)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside ``path``; on success move it to ``path`` (replacing an
    existing folder only with ``overwrite``), on any exception delete it."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(path)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".partial", dir=os.path.dirname(path))
    try:
        ordinary_mode(tmp, folder=True)
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".old", dir=os.path.dirname(path))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class StreamWriter:
    """Write a header for ``entries`` (reordered to :func:`data_order`), then accept each tensor's
    bytes in that order via :meth:`write`. Checks dtype, shape and completeness."""

    def __init__(self, fh, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.fh = fh
        self.order = data_order(entries)
        self._next = 0
        fh.write(header_bytes(self.order, metadata))

    def pending(self) -> Entry | None:
        return self.order[self._next] if self._next < len(self.order) else None

    def write(self, key: str, data) -> None:
        """``data``: a tensor (checked against the entry) or raw bytes of exactly the entry's size."""
        e = self.pending()
        if e is None or e.key != key:
            raise ValueError(f"stream writer expected {e.key if e else 'no more tensors'!r}, got {key!r}")
        if isinstance(data, torch.Tensor):
            if data.dtype != e.dtype or tuple(data.shape) != e.shape:
                raise ValueError(f"tensor {key!r}: got {data.dtype} {list(data.shape)}, header says {e.dtype} {list(e.shape)}")
            data = tensor_bytes(data)
        if len(data) != e.nbytes:
            raise ValueError(f"tensor {key!r}: {len(data)} bytes, header says {e.nbytes}")
        self.fh.write(data)
        self._next += 1

    def wrote_raw(self, key: str, nbytes: int) -> None:
        """Account for ``nbytes`` the caller wrote directly to ``fh`` as the next tensor ``key``."""
        e = self.pending()
        if e is None or e.key != key or nbytes != e.nbytes:
            raise ValueError(f"stream writer: raw bytes for {key!r} ({nbytes}) do not match the next entry {e}")
        self._next += 1

    def close(self) -> None:
        if self.pending() is not None:
            raise ValueError(f"stream writer: tensor {self.pending().key!r} and later ones were never written")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` atomically (whole-file replace)."""
    entries = [Entry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with atomic_file(path) as fh:
        w = StreamWriter(fh, entries, metadata)
        for e in w.order:
            w.write(e.key, tensors[e.key])
        w.close()
