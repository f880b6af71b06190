"""`lora-engine list [--dir D…] [--json]`: the LoRA library: names, aliases, files, hashes,
architecture, collisions."""
from __future__ import annotations

import json
import os
import sys

DEFAULT_DIRS = ("models/Lora", "models/LyCORIS")


def register(sub) -> None:
    p = sub.add_parser("list", help="list a LoRA library (names, aliases, hashes, architecture, collisions)")
    p.add_argument("--dir", dest="dirs", action="append", metavar="D", nargs="+",
                   help=f"LoRA folder(s); default: {', '.join(DEFAULT_DIRS)} when present")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--cache", metavar="FILE", help="hash cache file (default: in the first folder)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write a hash cache")
    p.add_argument("--no-hidden", action="store_true", help="skip folders whose name starts with '.'")
    p.set_defaults(func=run)


def _progress(i: int, path: str) -> None:
    if sys.stderr.isatty() and i % 25 == 0:
        print(f"\rscanning {i} files…", end="", file=sys.stderr, flush=True)


def _text(lib, report) -> str:
    lines = [f"{report.files} LoRA file(s) in {', '.join(lib.folders)}"
             f" ({report.read} read, {report.reused} from cache, {report.seconds:.2f}s)"]
    for e in lib.entries:
        alias = f"  alias {e.alias!r}" if e.alias != e.stem else ""
        lines.append(f"{lib.preferred_name(e)}{alias}")
        lines.append(f"  file {e.path}  {e.size} bytes  {e.format}  {e.sd_version}")
        lines.append(f"  short {e.short_hash}  sha256 {e.sha256}  legacy {e.legacy_hash}")
        lines.extend(f"  problem: {p}" for p in e.problems)
    for c in lib.collisions():
        lines.append(f"collision ({c.kind}) {c.name!r}: " + ", ".join(c.paths))
    lines.extend(f"warning: {w}" for w in report.warnings)
    return "\n".join(lines)


def run(args) -> int:
    from ...library.index import LoraLibrary

    dirs = [d for group in (args.dirs or []) for d in group] or [d for d in DEFAULT_DIRS if os.path.isdir(d)]
    if not dirs:
        print("lora-engine list: no folder given and none of " + ", ".join(DEFAULT_DIRS) + " exists; use --dir D",
              file=sys.stderr)
        return 2
    missing = [d for d in dirs if not os.path.isdir(d)]
    if missing:
        print(f"lora-engine list: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    lib = LoraLibrary(dirs, include_hidden=not args.no_hidden, cache_path=args.cache, use_cache=not args.no_cache)
    report = lib.scan(progress=_progress)
    if sys.stderr.isatty():
        print("\r", end="", file=sys.stderr)
    if args.json:
        doc = {"folders": lib.folders, "files": [dict(e.to_json(), name=lib.preferred_name(e)) for e in lib.entries],
               "collisions": [{"name": c.name, "kind": c.kind, "paths": list(c.paths)} for c in lib.collisions()],
               "warnings": list(report.warnings)}
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        print(_text(lib, report))
    return 0
