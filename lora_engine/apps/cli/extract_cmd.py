"""`lora-engine extract BASE TUNED -o OUT --rank R`: a LoRA from the difference of two checkpoints."""
from __future__ import annotations

from .tool_common import add_svd_method, add_writer_options, Bar, claim_output, dtype_arg


def register(sub) -> None:
    p = sub.add_parser("extract", help="extract a LoRA from two checkpoints of the same architecture (SVD per module)")
    p.add_argument("base", metavar="BASE", help="original checkpoint (.safetensors single file or diffusers folder)")
    p.add_argument("tuned", metavar="TUNED", help="fine-tuned checkpoint, same architecture and layout")
    p.add_argument("-o", "--out", required=True, help="output .safetensors (kohya format)")
    p.add_argument("--rank", type=int, required=True, help="rank (the cap for dynamic methods)")
    p.add_argument("--conv-rank", type=int, help="rank for k×k convs (default: --rank)")
    add_svd_method(p)
    p.add_argument("--min-diff", type=float, default=0.0, help="skip modules whose max |ΔW| is at most this")
    p.add_argument("--unet-naming", default="auto", choices=["auto", "diffusers", "sgm"],
                   help="UNet module names (auto: diffusers for SD1/SD2, sgm for SDXL, as sd-scripts)")
    add_writer_options(p, "default: the checkpoint's dtype")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...tools.extract import extract_file

    claim_output(args.out, args.overwrite)
    with Bar("extract", args.quiet) as bar:
        res = extract_file(args.base, args.tuned, args.out, args.rank, conv_rank=args.conv_rank,
                           method=args.method, param=args.param, min_diff=args.min_diff,
                           dtype=dtype_arg(args.precision), unet_naming=args.unet_naming, device=args.device, progress=bar)
    for w in res.warnings:
        print(f"warning: {w}")
    kept = [r.retained_fro for r in res.reports]
    print(f"wrote {args.out}: {len(kept)} modules differ; retained Frobenius mean "
          f"{sum(kept) / max(len(kept), 1):.4f}, min {min(kept, default=1.0):.4f}")
    return 0
