"""`lora-engine merge FILE[:W]… -o OUT [--rank R]`: several LoRAs into one, exactly (concatenated
ranks) or SVD-compressed to rank R (fixed or dynamic)."""
from __future__ import annotations

from ...syntax.file_weights import split_weights
from .tool_common import add_device, add_overwrite, add_precision, add_threads, Bar, claim_output, dtype_arg


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge LoRAs (weights, negative allowed) into one LoRA: exact or SVD to a rank")
    p.add_argument("loras", nargs="+", metavar="FILE[:W]", help="LoRA file and its weight (default 1)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors (kohya format)")
    p.add_argument("--rank", type=int, help="SVD-compress to this rank (a cap for dynamic methods); default: exact")
    p.add_argument("--method", default="fixed", choices=["fixed", "sv_ratio", "sv_fro", "sv_cumulative"])
    p.add_argument("--param", type=float, help="parameter of the dynamic method")
    add_precision(p, "default: the inputs' dtype")
    add_overwrite(p)
    p.add_argument("--quiet", action="store_true")
    add_device(p)
    add_threads(p)
    p.set_defaults(func=run, cancelled="nothing written")


def run(args) -> int:
    from ...tools.merge import merge_files

    specs = []
    for s in args.loras:
        path, w = split_weights(s, 1)
        specs.append((path, w[0] if w else 1.0))
    claim_output(args.out, args.overwrite)
    with Bar("merge", args.quiet) as bar:
        res = merge_files(specs, args.out, rank=args.rank, method=args.method, param=args.param,
                          dtype=dtype_arg(args.precision), device=args.device, progress=bar)
    for w in res.warnings:
        print(f"warning: {w}")
    kind = "exact (concatenated ranks)" if args.rank is None else f"SVD {args.method}"
    print(f"wrote {args.out}: {len(res.modules)} modules, {kind}, dim {res.metadata['ss_network_dim']}")
    if args.rank is not None and res.reports:
        worst = min(res.reports, key=lambda r: r.retained_fro)
        print(f"retained Frobenius norm: min {worst.retained_fro:.4f} ({worst.name})")
    return 0
