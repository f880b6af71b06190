"""`lora-engine merge FILE[:W]… -o OUT [--rank R]`: several LoRAs into one, exactly (concatenated
ranks) or SVD-compressed to rank R (fixed or dynamic)."""
from __future__ import annotations

from ...syntax.file_weights import split_weights
from .tool_common import add_svd_method, add_writer_options, Bar, claim_output, dtype_arg


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge LoRAs (weights, negative allowed) into one LoRA: exact or SVD to a rank")
    p.add_argument("loras", nargs="+", metavar="FILE[:W]", help="LoRA file and its weight (default 1)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors (kohya format)")
    p.add_argument("--rank", type=int, help="SVD-compress to this rank (a cap for dynamic methods); default: exact")
    add_svd_method(p, 'parameter of the dynamic method')
    p.add_argument("--force", action="store_true",
                   help="merge LoRAs made for different model families anyway (refused by default)")
    add_writer_options(p, "default: the inputs' dtype")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...tools.merge import merge_files

    specs = []
    for s in args.loras:
        path, w = split_weights(s, 1)
        specs.append((path, w[0] if w else 1.0))
    claim_output(args.out, args.overwrite)
    with Bar("merge", args.quiet) as bar:
        res = merge_files(specs, args.out, rank=args.rank, method=args.method, param=args.param,
                          dtype=dtype_arg(args.precision), device=args.device, progress=bar,
                          force=args.force)
    for w in res.warnings:
        print(f"warning: {w}")
    kind = "exact (concatenated ranks)" if args.rank is None else f"SVD {args.method}"
    print(f"wrote {args.out}: {len(res.modules)} modules, {kind}, dim {res.metadata['ss_network_dim']}")
    if args.rank is not None and res.reports:
        worst = min(res.reports, key=lambda r: r.retained_fro)
        print(f"retained Frobenius norm: min {worst.retained_fro:.4f} ({worst.name})")
    return 0
