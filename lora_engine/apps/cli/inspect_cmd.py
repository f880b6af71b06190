"""`lora-engine inspect FILE… [--json]`: the core's diagnosis of each file."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("inspect", help="format, adapter types, architecture, rank/alpha, metadata of LoRA files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...library.summary import format_summary, summarize

    summaries = [summarize(f) for f in args.files]
    if args.json:
        print(json.dumps([s.to_json() for s in summaries], indent=2, sort_keys=True))
    else:
        print("\n\n".join(format_summary(s) for s in summaries))
    return 1 if any(s.error for s in summaries) else 0
