"""`lora-engine resize FILE -o OUT --rank R [--method sv_fro --param 0.9]`: rank reduction by SVD,
with the retained Frobenius-norm fraction of every module."""
from __future__ import annotations

from .tool_common import add_svd_method, add_writer_options, Bar, claim_output, dtype_arg


def register(sub) -> None:
    p = sub.add_parser("resize", help="reduce a LoRA's rank by SVD (fixed or dynamic), report retained norm per module")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--out", required=True, help="output .safetensors (kohya format)")
    p.add_argument("--rank", type=int, required=True, help="new rank (the cap for dynamic methods)")
    p.add_argument("--conv-rank", type=int, help="cap for k×k conv modules (default: --rank)")
    add_svd_method(p, 'sv_ratio: max/min singular-value ratio; sv_fro, sv_cumulative: fraction')
    add_writer_options(p, "default: the input's dtype")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...tools.resize import resize_file

    claim_output(args.out, args.overwrite)
    with Bar("resize", args.quiet) as bar:
        res = resize_file(args.file, args.out, args.rank, method=args.method, param=args.param,
                          conv_rank=args.conv_rank, dtype=dtype_arg(args.precision), device=args.device, progress=bar)
    if not args.quiet:
        for r in res.reports:
            print(f"{r.name}  rank {r.old_rank} -> {r.new_rank}  retained Frobenius {r.retained_fro:.4f}")
    for w in res.warnings:
        print(f"note: {w}")
    kept = [r.retained_fro for r in res.reports]
    print(f"wrote {args.out}: {len(kept)} modules, dim {res.metadata['ss_network_dim']}, retained Frobenius "
          f"mean {sum(kept) / max(len(kept), 1):.4f}, min {min(kept, default=1.0):.4f}")
    return 0
