"""A validating, memory-mapped safetensors reader.

Layout: 8-byte little-endian header length N, N bytes of JSON header
(``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``),
then the data region. Offsets are relative to the data region.

Tensors are zero-copy views of a copy-on-write memory map: nothing is read from disk until
a tensor's bytes are used. The whole header is checked against the file before any tensor
is made, so a truncated or hostile file gives one :class:`LoraFileError` naming the file and
the problem, never another exception. The checks, in order:

1. the file can be opened, is not empty and holds at least the 8-byte length prefix;
2. the header length N is at most ``MAX_HEADER_BYTES`` (100,000,000, the reference reader's
   limit) and ``8 + N`` is within the file;
3. after optional JSON whitespace, the header starts with ``{``;
4. its size as JSON, measured on the raw bytes before anything is parsed (a few C-speed
   passes, no recursion): at most ``MAX_STRINGS`` strings, and outside strings at most
   ``MAX_OBJECTS`` objects, ``MAX_COMMAS`` commas and ``MAX_BRACKETS`` brackets, which
   balance within ``MAX_DEPTH`` levels of nesting. This bounds the time and memory of all
   that follows: a header of 300,000 entries is refused here, after two byte counts;
5. UTF-8, and JSON syntax (Python's parser, strict): ``NaN``/``Infinity`` and numbers out of
   a double's range are refused, as is an integer longer than Python's digit limit (4,300 by
   default);
6. no object has the same key twice (tensor names, metadata keys, entry fields);
7. the header is an object of at most ``MAX_TENSORS`` tensor entries; ``__metadata__`` is
   absent, ``null`` or an object of strings; a lone UTF-16 surrogate escape (``"\\ud800"``)
   in a metadata key or value is replaced by U+FFFD, so metadata always prints, caches and
   serialises as JSON;
8. a tensor name holds no lone surrogate;
9. each tensor entry is an object with ``dtype`` (a name in ``DTYPES``), ``shape`` (a list of
   JSON integers, each ``0 <= d < 2**64``) and ``data_offsets`` (a list of exactly two such
   integers, ``begin <= end``); further fields are ignored. A JSON integer is written without
   fraction or exponent: ``1.0``, ``1e3``, ``true`` and ``"1"`` are not integers, and ``-0``
   counts as a float, as it does for the reference reader;
10. the element count (product of the shape) stays below ``2**64`` and the product of the
    non-zero dimensions below ``2**63`` (a torch tensor's strides), so zero-element shapes
    such as ``[0, 2**62, 2**10]`` are refused instead of overflowing later;
11. ``end - begin`` equals element count times element size;
12. each tensor ends within the file ("truncated" otherwise);
13. ordered by ``(begin, end)``, the first tensor starts at 0, each starts where the previous
    one ended (no gap, no overlap) and the last ends at the end of the file (no trailing bytes).

Where this differs from the reference reader (``safetensors`` 0.8), on purpose:

- it also refuses duplicate keys even when identical (the reference keeps the last one),
  headers beyond the bounds of check 4 (the reference parses an extra entry field up to 128
  levels deep), dtypes outside ``DTYPES`` (F4, F6_*, F8_E8M0, F8_*FNUZ, C64: no LoRA holds
  them), and zero-element shapes whose non-zero dimensions overflow int64 (the reference opens
  those, then fails to make a torch tensor of them);
- it accepts lone surrogates in metadata (as U+FFFD), which the reference refuses as JSON:
  Python writers produce them from undecodable file names (``surrogateescape``), and the
  weights of such a file are sound;
- a tensor whose bytes are not aligned to its element size (a writer that did not pad the
  header) is accepted, as the reference does, and copied to aligned memory when read.
"""
from __future__ import annotations

import gc
import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass

import torch

from ..errors import LoraFileError
from ..text import clean_text, has_surrogate

MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit
# Tensors per file. The largest real files: a LyCORIS LoHa/LoKr (up to 7 tensors a module) on every layer of SDXL or
# Flux, 5,000-7,000; a full SDXL LoRA 2,958; a single-file SDXL checkpoint ~2,600. 16,384 leaves 2-3x that, and keeps
# the worst file a library scan meets to seconds: every entry costs Python work (JSON, checks, key parsing, a
# tensor view, an adapter), ~0.1 ms on a busy 2-core box, so 65,536 entries took 18 s there.
MAX_TENSORS = 16_384
MAX_OBJECTS = MAX_TENSORS + 2  # one per tensor entry, the header itself, __metadata__
MAX_STRINGS = 8 * MAX_TENSORS  # an entry holds 5 (name, three field names, dtype); metadata 2 per key
MAX_COMMAS = 16 * MAX_TENSORS  # an entry holds 4 to 8 (3 fields, 2 offsets, shape of up to 5 dims)
MAX_BRACKETS = 8 * MAX_TENSORS  # an entry holds 6 (its object, shape and offsets lists)
# header object -> tensor entry -> shape/offsets list is 3 levels; the reference reader ignores extra entry fields
# (it parses them), so a little room is left for those.
MAX_DEPTH = 8
_U64 = 2**64 - 1
_I64 = 2**63 - 1

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}

_STRING = re.compile(rb'"[^"]*"')  # a JSON string once its escapes are removed
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_INNERMOST = re.compile(rb"[\[{][\]}]")  # on brackets only: the innermost pairs
_OPENS_OBJECT = re.compile(rb"[ \t\n\r]*\{")
_MINUS_ZERO = re.compile(rb"-0(?![0-9.eE])")  # the integer -0, in the bytes outside strings


class _HeaderProblem(Exception):
    """Raised from inside the JSON parser's hooks; turned into a LoraFileError."""


def _size_problem(raw: bytes) -> tuple[str | None, bytes]:
    """Check 4: count strings, objects, commas and nesting on the raw bytes, before parsing. Returns the problem
    (or None) and the header's structure (the bytes outside strings).

    Escapes go first (``\\\\`` pairs, then ``\\"``), so every quote left delimits a string; with the strings
    cut out, what remains is the JSON structure. For valid JSON the counts are exact; for invalid JSON they
    are still bounds, and the parser refuses it afterwards."""
    # A lower bound first, on the raw bytes (two C-speed counts, no copy): a quote preceded by a backslash may be
    # a real one after an escaped backslash, so subtracting them all under-counts. A header of 300,000 entries
    # stops here.
    at_least = (raw.count(b'"') - raw.count(b'\\"')) // 2
    if at_least > MAX_STRINGS:
        return (f"header too large: {at_least:,} JSON strings or more, more than a file of {MAX_TENSORS:,} tensors"
                " can need"), b""
    s = raw.replace(b"\\\\", b"") if b"\\\\" in raw else raw
    if b'\\"' in s:
        s = s.replace(b'\\"', b"")
    strings = s.count(b'"') // 2
    if strings > MAX_STRINGS:
        return f"header too large: {strings:,} JSON strings, more than a file of {MAX_TENSORS:,} tensors can need", b""
    bare = _STRING.sub(b"", s)
    objects = bare.count(b"{")
    if objects > MAX_OBJECTS:
        return f"header too large: {objects - 1:,} entries, more than the limit of {MAX_TENSORS:,} tensors", bare
    commas = bare.count(b",")
    if commas > MAX_COMMAS:
        return f"header too large: {commas:,} JSON values, more than a file of {MAX_TENSORS:,} tensors can need", bare
    brackets = bare.translate(None, _NOT_BRACKETS)
    if len(brackets) > MAX_BRACKETS:
        return (f"header too large: {len(brackets):,} brackets, more than a file of {MAX_TENSORS:,} tensors"
                " can need"), bare
    for _ in range(MAX_DEPTH):
        if not brackets:
            return None, bare
        brackets = _INNERMOST.sub(b"", brackets)
    if brackets:
        return f"garbage safetensors header (brackets unbalanced or nested deeper than {MAX_DEPTH} levels)", bare
    return None, bare


def _pairs(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _HeaderProblem(f"duplicate key {_short(k)} in the header")
            seen.add(k)
    return d


def _no_constant(name: str):
    raise _HeaderProblem(f"garbage safetensors header ({name} is not JSON)")


def _float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _HeaderProblem(f"garbage safetensors header (number {text[:40]} out of range)")
    return v


def _int(text: str):
    return -0.0 if text == "-0" else int(text)  # "-0" is a float to the reference reader


def _parse_json(text: str, minus_zero: bool):
    """json.loads with the hooks of checks 5-6, and the cyclic GC paused: a 3000-key header builds ~10k
    containers, which in a host process holding millions of objects can trigger a full collection (measured:
    0.9 s vs 3 ms). Integers go through a Python hook only when the text holds a ``-0`` (rare)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant, parse_float=_float,
                          parse_int=_int if minus_zero else int)
    finally:
        if enabled:
            gc.enable()


def _short(name) -> str:
    """A name for a one-line message: repr (so control characters and surrogates print), at most ~80 chars."""
    r = repr(name)
    return r if len(r) <= 80 else r[:60] + "…" + r[-16:]


def _element_count(shape) -> int | None:
    """Product of ``shape``; None when it is not a list of JSON integers ``0 <= d < 2**64``; -1 when the product
    of its non-zero dimensions exceeds int64 (torch's strides; this also keeps the count below the reference
    reader's 2**64). Stops at the first overflow: a shape of a million huge dimensions costs no big-integer
    arithmetic."""
    if type(shape) is not list:
        return None
    count = strides = 1
    for d in shape:
        if type(d) is not int or d < 0 or d > _U64:
            return None
        count *= d
        if d:
            strides *= d
            if strides > _I64:
                return -1
    return count


def _json_type(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(v), type(v).__name__)


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int


class SafetensorsFile:
    """Open one safetensors file: ``keys()``, ``get(key)``, ``metadata``, ``info``.

    ``data_offset`` is where the tensor data starts (used for A1111's addnet hash).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size == 0:
                    raise LoraFileError(self.path, "empty file (0 bytes)")
                if size < 8:
                    raise LoraFileError(self.path, f"truncated: {size} bytes, too short for a safetensors header")
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise LoraFileError(
                        self.path,
                        # the claimed length is the file's first 8 bytes: never echoed (a path given by a
                        # web client could name a secret file)
                        f"not a valid safetensors file: header claims more bytes than the file's {size}"
                        + (f" (the limit is {MAX_HEADER_BYTES:,})" if n > MAX_HEADER_BYTES else
                           " (truncated, or not safetensors)"),
                    )
                raw = fh.read(n)
        except OSError as e:
            raise LoraFileError(self.path, f"cannot open: {e.strerror or e}") from None
        if len(raw) != n:
            raise LoraFileError(self.path, f"short read: {len(raw)} of {n} header bytes")
        self.data_offset = 8 + n
        self.file_size = size
        header = self._parse(raw)
        meta = header.pop("__metadata__", None)
        self.metadata: dict[str, str] = self._check_metadata(meta)
        self.info: dict[str, TensorInfo] = self._check_entries(header)
        self._mmap: mmap.mmap | None = None

    def _fail(self, problem: str):
        raise LoraFileError(self.path, problem)

    def _parse(self, raw: bytes) -> dict:
        if not _OPENS_OBJECT.match(raw):
            self._fail("garbage safetensors header (not a JSON object)")
        problem, bare = _size_problem(raw)
        if problem:
            self._fail(problem)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LoraFileError(self.path, f"garbage safetensors header (not UTF-8 at byte {e.start})") from None
        try:
            header = _parse_json(text, _MINUS_ZERO.search(bare) is not None)
        except _HeaderProblem as e:
            raise LoraFileError(self.path, str(e)) from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, a >4300-digit integer; recursion is bounded
            raise LoraFileError(self.path, f"garbage safetensors header (not JSON: {str(e)[:120]})") from None
        if not isinstance(header, dict):
            self._fail("garbage safetensors header (not a JSON object)")
        return header

    def _check_metadata(self, meta) -> dict[str, str]:
        if meta is None:
            return {}
        if not isinstance(meta, dict):
            self._fail(f"safetensors __metadata__ is {_json_type(meta)}, not an object")
        out: dict[str, str] = {}
        for k, v in meta.items():
            if not isinstance(v, str):
                self._fail(f"safetensors __metadata__ value for {_short(clean_text(k))} is {_json_type(v)},"
                           " not a string")
            out[clean_text(k)] = clean_text(v)  # two keys that differ only in lone surrogates: the last wins
        return out

    def _check_entries(self, header: dict) -> dict[str, TensorInfo]:
        if len(header) > MAX_TENSORS:  # check 4 counted objects, which leaves room for __metadata__
            self._fail(f"header too large: {len(header):,} entries, more than the limit of {MAX_TENSORS:,} tensors")
        data_len = self.file_size - self.data_offset
        info: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            info[key] = self._check_entry(key, entry, data_len)
        at = self.data_offset
        for begin, end, key in sorted((ti.begin, ti.end, key) for key, ti in info.items()):  # check 13
            if begin != at:
                what = "a gap of" if begin > at else "an overlap of"
                self._fail(f"tensor {_short(key)}: data_offsets start at {begin - self.data_offset} but the previous"
                           f" tensor ends at {at - self.data_offset} ({what} {abs(begin - at)} bytes)")
            at = end
        if at != self.file_size:
            self._fail(f"{self.file_size - at} bytes after the last tensor's data (the header does not describe"
                       " the whole file)")
        return info

    def _check_entry(self, key: str, entry, data_len: int) -> TensorInfo:
        # Checks 8-12. Runs once per tensor: plain loops and type() tests, the message built only on failure.
        if has_surrogate(key):
            self._fail(f"tensor {_short(key)}: its name holds a lone UTF-16 surrogate (not valid Unicode)")
        if type(entry) is not dict:
            self._fail(f"tensor {_short(key)}: header entry is {_json_type(entry)}, not an object")
        try:
            dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        except KeyError as e:
            raise LoraFileError(self.path, f"tensor {_short(key)}: header entry has no {e.args[0]!r}") from None
        if type(dtype_name) is not str:
            self._fail(f"tensor {_short(key)}: dtype {_short(dtype_name)} is not a string")
        if dtype_name not in DTYPES:
            self._fail(f"tensor {_short(key)}: unsupported dtype {_short(dtype_name)}")
        count = _element_count(shape)
        if count is None:
            self._fail(f"tensor {_short(key)}: shape {_short(shape)} is not a list of non-negative integers")
        if count < 0:
            self._fail(f"tensor {_short(key)}: shape {_short(shape)} is too large (its size overflows)")
        if type(offsets) is not list or len(offsets) != 2:
            self._fail(f"tensor {_short(key)}: data_offsets {_short(offsets)} are not two non-negative integers")
        begin, end = offsets
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= _U64 or not 0 <= end <= _U64:
            self._fail(f"tensor {_short(key)}: data_offsets {_short(offsets)} are not two non-negative integers")
        if end < begin:
            self._fail(f"tensor {_short(key)}: data_offsets end {end} before they begin ({begin})")
        nbytes = count * ITEMSIZE[dtype_name]
        if end - begin != nbytes:
            self._fail(f"tensor {_short(key)}: header says {end - begin} bytes for shape {_short(shape)} {dtype_name}"
                       f" which needs {nbytes}")
        if end > data_len:
            self._fail(f"truncated: tensor {_short(key)} ends at byte {self.data_offset + end} but the file has"
                       f" {self.file_size}")
        return TensorInfo(DTYPES[dtype_name], tuple(shape), self.data_offset + begin, self.data_offset + end)

    def keys(self) -> list[str]:
        return list(self.info)

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as fh:
                # ACCESS_COPY: writable (so torch does not warn), lazily paged, never written back.
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mmap

    def get(self, key: str) -> torch.Tensor:
        """A tensor viewing the mapped bytes (no copy; a copy only when the bytes are misaligned)."""
        ti = self.info[key]
        if ti.end == ti.begin:
            return torch.empty(ti.shape, dtype=ti.dtype)
        if ti.begin % ti.dtype.itemsize:  # a writer that did not pad the header: copy to aligned memory
            raw = torch.frombuffer(self._map(), dtype=torch.uint8, count=ti.end - ti.begin, offset=ti.begin)
            return raw.clone().view(ti.dtype).reshape(ti.shape)
        count = (ti.end - ti.begin) // ti.dtype.itemsize
        return torch.frombuffer(self._map(), dtype=ti.dtype, count=count, offset=ti.begin).reshape(ti.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.info}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return ``(tensors, metadata)``; tensors are zero-copy views of the mapped file."""
    f = SafetensorsFile(path)
    return f.tensors(), f.metadata
