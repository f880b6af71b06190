"""A library of LoRA files over one or more folders, and the one name resolver every host uses.

A name resolves, in this order (each step exact first, then case-insensitive when that
gives exactly one file):

1. ``sub/folder/stem`` (or with its extension) relative to a configured folder;
2. the file stem, or the ``ss_output_name`` alias from the file's metadata (stems win
   over aliases, as A1111's forbidden-alias rule does);
3. a hash prefix (A1111 short hash, addnet hash or sha256; at least 8 hex digits).

Two files that answer the same name are a collision: resolving it raises
:class:`NameResolutionError` naming both files, and :meth:`LoraLibrary.collisions` lists
them. Names that could leave the folders (``..``, absolute paths, drive letters) are refused.

Per file: size, mtime, safetensors metadata, hashes (:mod:`lora_engine.library.hashes`), format
and architecture (:func:`lora_engine.library.summary.summarize`), and A1111-style sidecars:
preview ``stem.{png,jpg,jpeg,webp,gif}`` or ``stem.preview.*``, user metadata
``stem.json``, description ``stem.txt`` or ``stem.description.txt``. Everything read from
the file is cached in a sidecar cache (:mod:`lora_engine.library.sidecar`), so a refresh
only re-reads files whose size or mtime changed.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from ..errors import LoraEngineError, NameResolutionError, OperationCancelled
from ..families import FAMILIES
from .confine import inside, normalise
from .hashes import bogus_metadata_hash, hash_file, short_hash
from ..text import clean_value
from .sidecar import DEFAULT_CACHE_NAME, LibraryCache

LORA_EXTS = (".safetensors", ".ckpt", ".pt")
PREVIEW_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
# architecture -> the version label A1111's cards and our filters show; DiT families by their declared label
SD_VERSIONS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "other": "other",
               **{f.name: f.label for f in FAMILIES}, "flux/sd3": "Flux.1/SD3"}
MAX_SIDECAR_BYTES = 1 << 20
_HEX_RE = re.compile(r"(?:0x)?[0-9a-f]{8,64}\Z")


@dataclass(frozen=True)
class Sidecars:
    preview: str | None = None
    user_metadata: dict = field(default_factory=dict)
    description: str | None = None


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA file. ``key`` is its path below its folder, ``/``-separated, without extension."""

    path: str
    root: str
    key: str
    stem: str
    size: int
    mtime_ns: int
    metadata: dict
    alias: str
    sha256: str | None
    addnet_hash: str | None
    short_hash: str | None
    legacy_hash: str | None
    format: str
    architecture: str
    sidecars: Sidecars
    problems: tuple[str, ...] = ()
    has_cover_image: bool = False  # ssmd_cover_images in the metadata (left out of ``metadata``)
    unreadable: bool = False  # its header could not be read (``problems`` says why)

    @property
    def sd_version(self) -> str:
        """SD1 / SD2 / SDXL / other / unknown; the user metadata's "sd version" wins when set."""
        user = str(self.sidecars.user_metadata.get("sd version", "") or "")
        if user and user.lower() != "unknown":
            return user
        return SD_VERSIONS.get(self.architecture, "unknown")

    def to_json(self) -> dict:
        d = asdict(self)
        d["sd_version"] = self.sd_version
        return d


@dataclass(frozen=True)
class Collision:
    name: str
    kind: str  # "stem" | "alias" | "path"
    paths: tuple[str, ...]


@dataclass(frozen=True)
class ScanReport:
    files: int
    read: int  # files (re)read and hashed this scan
    reused: int  # files taken from the cache
    removed: int
    seconds: float
    warnings: tuple[str, ...]


def _natural_key(s: str) -> list:
    """Natural order, "lora2" before "lora10". The split puts runs of decimal digits (``\\d``) at odd positions, so
    the parts always alternate text / number; ``isdigit`` would also take "²" (not a decimal) to int()."""
    return [int(t) if t.isdecimal() else t.lower() for t in re.split(r"(\d+)", s)]


def _summarize(path: str) -> tuple[str, str, str | None]:
    """(format, architecture, error) from the core diagnosis; degrades to unknown on any failure."""
    try:
        from .summary import summarize

        s = summarize(path, check_finite=False)  # header-level: a folder scan must not read every byte
        return str(s.format), str(s.architecture), getattr(s, "error", None)
    except Exception as e:  # noqa: BLE001 - one odd file must not stop a library scan
        return "unknown", "unknown", f"{type(e).__name__}: {e}"


def _read_metadata(path: str) -> tuple[dict, str | None]:
    if not path.lower().endswith(".safetensors"):
        return {}, None  # pickles are never opened for a listing
    from ..formats.safetensors_file import SafetensorsFile

    try:
        return dict(SafetensorsFile(path).metadata), None
    except LoraEngineError as e:
        return {}, str(e)


def read_file_record(path: str, hash_files: bool = True, summarize_files: bool = True) -> dict:
    """Everything the cache keeps about one file (hashes, metadata without cover images, summary).

    ``summarize_files=False`` skips :func:`lora_engine.library.summary.summarize` (header-level: no
    NaN scan); format and architecture are then "unknown" until a scan that summarizes."""
    meta, meta_err = _read_metadata(path)
    record: dict = {"has_cover": "ssmd_cover_images" in meta,
                    "metadata": {k: v for k, v in meta.items() if k != "ssmd_cover_images"}}
    problems = [meta_err] if meta_err else []
    if bogus_metadata_hash(meta):
        problems.append(f"{path}: sshs_model_hash is the hash of no bytes (a writer bug); computed hash used")
    record.update(sha256=None, addnet=None, legacy=None)
    if hash_files:
        try:
            h = hash_file(path)
            record.update(sha256=h.sha256, addnet=h.addnet, legacy=h.legacy)
        except LoraEngineError as e:
            if not meta_err:  # an unreadable header fails the hash too: one line per file
                problems.append(str(e))
            meta_err = meta_err or str(e)
    fmt, arch, err = _summarize(path) if summarize_files else ("unknown", "unknown", None)
    record.update(format=fmt, architecture=arch, summarized=summarize_files)
    if err and not meta_err:
        problems.append(err)
    record["problems"] = problems
    record["unreadable"] = bool(meta_err)  # not worth re-reading until it changes on disk
    return record


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read(MAX_SIDECAR_BYTES)


def read_sidecars(folder: str, stem: str, siblings: set[str]) -> tuple[Sidecars, list[str]]:
    problems: list[str] = []
    preview = next((os.path.join(folder, n) for e in PREVIEW_EXTS for n in (stem + e, stem + ".preview" + e)
                    if n in siblings), None)
    user: dict = {}
    if stem + ".json" in siblings:
        p = os.path.join(folder, stem + ".json")
        try:
            data = json.loads(_read_text(p))
            if isinstance(data, dict):
                user = clean_value(data)  # "\ud800" escapes decode to text that cannot be printed
            else:
                problems.append(f"{p}: user metadata is not a JSON object; ignored")
        except (OSError, ValueError, RecursionError) as e:
            problems.append(f"{p}: unreadable user metadata ({str(e)[:120]}); ignored")
    desc = None
    for n in (stem + ".txt", stem + ".description.txt"):
        if n in siblings:
            try:
                desc = _read_text(os.path.join(folder, n))
                break
            except OSError as e:
                problems.append(f"{os.path.join(folder, n)}: unreadable description ({e.strerror or e})")
    if desc is None and isinstance(user.get("description"), str) and user["description"]:
        desc = user["description"]
    return Sidecars(preview, user, desc), problems


def check_name(name: str) -> str:
    """Normalise a prompt name (``\\`` -> ``/``, no empty or ``.`` parts) or refuse one that
    could leave the library folders."""
    if not isinstance(name, str) or not name.strip():
        raise NameResolutionError("empty LoRA name")
    n = normalise(name)
    if n is None:
        raise NameResolutionError(f"LoRA name {name!r} refused: it points outside the LoRA folders")
    return n


class LoraLibrary:
    """LoRA files under ``folders`` (recursive, following symlinks, loops cut).

    ``cache_path``: the hash/metadata cache file (default: ``.lora-engine-cache.json`` in
    the first folder; ``None`` with ``use_cache=False`` keeps it in memory only).
    ``within_folders``: skip (with a scan warning, unread) files and sub-folders whose real path,
    symlinks resolved, lies outside the real paths of all ``folders`` (a web UI's confinement)."""

    def __init__(self, folders: Iterable[str | os.PathLike], *, include_hidden: bool = True,
                 cache_path: str | os.PathLike | None = None, use_cache: bool = True, hash_files: bool = True,
                 summarize_files: bool = True, within_folders: bool = False):
        self.folders = [os.path.abspath(os.fspath(f)) for f in folders]
        self.within_folders = within_folders
        self.include_hidden = include_hidden
        self.hash_files = hash_files
        self.summarize_files = summarize_files
        if use_cache and cache_path is None and self.folders:
            cache_path = os.path.join(self.folders[0], DEFAULT_CACHE_NAME)
        self.cache = LibraryCache(cache_path if use_cache else None)
        self.entries: list[LoraEntry] = []
        self._index: dict[str, dict[str, list[LoraEntry]]] = {"path": {}, "stem": {}, "alias": {}, "hash": {}}

    # ---- scanning ----

    def _outside(self, real: str, real_roots: list[str]) -> bool:
        return self.within_folders and not any(inside(real, r) for r in real_roots)

    def _walk(self, warnings: list[str]) -> Iterable[tuple[str, str, str, str, set[str]]]:
        """(root, folder, key prefix, filename, sibling names) for every LoRA file, in natural order."""
        seen: set[str] = set()
        real_roots = [os.path.realpath(f) for f in self.folders]
        for root in self.folders:
            if not os.path.isdir(root):
                continue
            for folder, dirs, files in os.walk(root, followlinks=True):
                real = os.path.realpath(folder)
                if real in seen:
                    dirs[:] = []
                    continue
                seen.add(real)
                if self._outside(real, real_roots):
                    warnings.append(f"{folder}: links outside the LoRA folders; skipped")
                    dirs[:] = []
                    continue
                dirs[:] = sorted((d for d in dirs if self.include_hidden or not d.startswith(".")), key=_natural_key)
                siblings = set(files)
                rel = os.path.relpath(folder, root).replace(os.sep, "/")
                prefix = "" if rel == "." else rel + "/"
                for f in sorted(files, key=_natural_key):
                    if f.lower().endswith(LORA_EXTS) and (self.include_hidden or not f.startswith(".")):
                        path = os.path.join(folder, f)
                        if os.path.islink(path) and self._outside(os.path.realpath(path), real_roots):
                            warnings.append(f"{path}: links outside the LoRA folders; skipped")
                            continue
                        yield root, folder, prefix, f, siblings

    def scan(self, progress: Callable[[int, str], None] | None = None, cancel=None) -> ScanReport:
        """(Re)build the library. Unchanged files come from the cache; ``progress(i, path)`` is
        called per file. Setting ``cancel`` (a ``threading.Event``) raises
        :class:`OperationCancelled` before the next file; what was read so far stays cached."""
        t0 = time.perf_counter()
        entries: list[LoraEntry] = []
        read = reused = 0
        warnings = list(self.cache.warnings)
        self.cache.warnings.clear()
        try:
            for i, (root, folder, prefix, fname, siblings) in enumerate(self._walk(warnings)):
                path = os.path.join(folder, fname)
                if cancel is not None and cancel.is_set():
                    raise OperationCancelled(f"library scan cancelled after {i} files")
                if progress is not None:
                    progress(i, path)
                try:
                    st = os.stat(path)
                except OSError as e:
                    warnings.append(f"{path}: cannot stat ({e.strerror or e}); skipped")
                    continue
                rec = self.cache.get(path, st.st_size, st.st_mtime_ns)
                if self._stale(rec):
                    rec = read_file_record(path, self.hash_files, self.summarize_files)
                    self.cache.put(path, st.st_size, st.st_mtime_ns, rec)
                    read += 1
                else:
                    reused += 1
                entries.append(self._entry(root, folder, prefix, fname, siblings, st, rec))
            removed = self.cache.prune({e.path for e in entries}, self.folders)
        finally:
            self.cache.save()
        warnings.extend(self.cache.warnings)
        self.cache.warnings.clear()
        self._set_entries(entries)
        return ScanReport(len(entries), read, reused, removed, time.perf_counter() - t0, tuple(warnings))

    refresh = scan

    def _stale(self, rec: dict | None) -> bool:
        """No record, or one made without something this library wants (and not an unreadable file)."""
        if rec is None:
            return True
        if rec.get("unreadable"):
            return False
        return (self.hash_files and rec.get("sha256") is None) or (self.summarize_files and not rec.get("summarized"))

    def _entry(self, root, folder, prefix, fname, siblings, st, rec) -> LoraEntry:
        stem = os.path.splitext(fname)[0]
        rel = prefix + stem
        sidecars, side_problems = read_sidecars(folder, stem, siblings)
        meta = rec.get("metadata") or {}
        alias = str(meta.get("ss_output_name") or "").strip() or stem
        if alias.lower() == "none":
            alias = stem
        return LoraEntry(os.path.join(folder, fname), root, rel, stem, st.st_size, st.st_mtime_ns, meta, alias,
                         rec.get("sha256"), rec.get("addnet"), short_hash(rec.get("addnet"), meta), rec.get("legacy"),
                         rec.get("format", "unknown"), rec.get("architecture", "unknown"), sidecars,
                         tuple(rec.get("problems") or ()) + tuple(side_problems), bool(rec.get("has_cover")),
                         bool(rec.get("unreadable")))

    def _set_entries(self, entries: list[LoraEntry]) -> None:
        self.entries = entries
        index: dict[str, dict[str, list[LoraEntry]]] = {"path": {}, "stem": {}, "alias": {}, "hash": {}}
        for e in entries:
            for h in {v.lower()[:8] for v in (e.short_hash, e.addnet_hash, e.sha256) if v}:
                index["hash"].setdefault(h, []).append(e)
            index["path"].setdefault(e.key.lower(), []).append(e)
            index["stem"].setdefault(e.stem.lower(), []).append(e)
            if e.alias != e.stem:
                index["alias"].setdefault(e.alias.lower(), []).append(e)
        self._index = index

    # ---- resolving ----

    def _match(self, kinds: tuple[str, ...], name: str, exact: bool) -> list[LoraEntry]:
        attr = {"path": "key", "stem": "stem", "alias": "alias"}
        out: list[LoraEntry] = []
        for kind in kinds:
            for e in self._index[kind].get(name.lower(), []):
                if (not exact or getattr(e, attr[kind]) == name) and e not in out:
                    out.append(e)
        return out

    def _pick(self, kinds: tuple[str, ...], name: str, shown: str) -> LoraEntry | None:
        for exact in (True, False):
            for group in ((kinds,) if not exact else tuple((k,) for k in kinds)):
                hits = self._match(group, name, exact)
                if len(hits) == 1:
                    return hits[0]
                if hits:
                    raise NameResolutionError(_ambiguous(shown, hits))
        return None

    def find_by_hash(self, h: str) -> list[LoraEntry]:
        """Entries whose short hash, addnet hash or sha256 starts with ``h`` (case-insensitive)."""
        h = h.strip().lower()
        if not _HEX_RE.match(h):
            return []
        return [e for e in self._index["hash"].get(h[:8], [])
                if any(v and v.lower().startswith(h) for v in (e.short_hash, e.addnet_hash, e.sha256))]

    def resolve(self, name: str, rescan_if_missing: bool = False) -> LoraEntry:
        """The single file ``name`` means, or :class:`NameResolutionError` with the reason.

        With ``rescan_if_missing`` an unknown name triggers one :meth:`refresh` (cheap: the
        cache answers for unchanged files) before giving up, as A1111 rescans for new files."""
        n = check_name(name)
        hit = self._lookup(n, name)
        if hit is None and rescan_if_missing:
            self.refresh()
            hit = self._lookup(n, name)
        if hit is None:
            raise NameResolutionError(f"LoRA {name!r} not found in {', '.join(self.folders) or 'no folders'}")
        return hit

    def _lookup(self, n: str, shown: str) -> LoraEntry | None:
        candidates = [n]
        base, ext = os.path.splitext(n)
        if ext.lower() in LORA_EXTS:
            candidates.append(base)
        for c in candidates:
            hit = self._pick(("path",) if "/" in c else ("stem", "alias"), c, shown)
            if hit is not None:
                return hit
        by_hash = self.find_by_hash(n)
        if by_hash and len({e.addnet_hash for e in by_hash}) == 1:
            return by_hash[0]  # same tensor data: any copy gives the same result
        if by_hash:
            raise NameResolutionError(_ambiguous(shown, by_hash))
        return None

    def preferred_name(self, entry: LoraEntry) -> str:
        """The shortest name that resolves to ``entry``: its stem when unique, else its path key."""
        for n in (entry.stem, entry.key):
            try:
                if self.resolve(n) is entry:
                    return n
            except NameResolutionError:
                pass
        return entry.key

    def for_model(self, sd_version: str, include_unknown: bool = True) -> list[LoraEntry]:
        """Entries made for ``sd_version`` (SD1/SD2/SDXL/other), plus unknown ones unless told not
        to: for UIs that badge or filter, never for silently refusing a file."""
        want = sd_version.lower()
        return [e for e in self.entries
                if e.sd_version.lower() == want or (include_unknown and e.sd_version == "unknown")]

    def collisions(self) -> list[Collision]:
        """Names that more than one file answers (stems and aliases case-insensitively, and path keys)."""
        out: list[Collision] = []
        for kind in ("path", "stem"):
            for name, es in self._index[kind].items():
                if len(es) > 1:
                    out.append(Collision(es[0].key if kind == "path" else es[0].stem, kind, tuple(e.path for e in es)))
        for name, es in self._index["alias"].items():
            clash = es + [e for e in self._index["stem"].get(name, []) if e not in es]
            if len(clash) > 1:
                out.append(Collision(es[0].alias, "alias", tuple(e.path for e in clash)))
        return out


def _ambiguous(name: str, hits: list[LoraEntry]) -> str:
    listed = ", ".join(e.path for e in hits[:4]) + (", ..." if len(hits) > 4 else "")
    return (f"LoRA {name!r} is ambiguous: {len(hits)} files match ({listed}); "
            "write it as sub/folder/name or by its short hash")
