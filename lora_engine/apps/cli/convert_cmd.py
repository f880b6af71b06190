"""`lora-engine convert FILE -o OUT --to kohya|peft|diffusers`: between kohya/LyCORIS safetensors,
PEFT adapter folders and diffusers LoRA files (bit-exact round trips for LoRA modules)."""
from __future__ import annotations

from .tool_common import run_tool


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert LoRAs between kohya and PEFT/diffusers formats")
    p.add_argument("file", metavar="FILE", help="LoRA file or PEFT folder")
    p.add_argument("-o", "--out", required=True, help="output file (kohya, diffusers) or folder (peft)")
    p.add_argument("--to", required=True, choices=["kohya", "peft", "diffusers"])
    p.add_argument("--reference", metavar="MODEL", help="diffusers model folder giving module paths "
                   "(needed for sgm-named SDXL UNet keys and transformers>=5 text encoders)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...tools.convert import convert

    def go():
        res = convert(args.file, args.out, args.to, reference=args.reference, overwrite=args.overwrite)
        kept = f" ({res.kept_as_is} LyCORIS modules kept as they are)" if res.kept_as_is else ""
        print(f"wrote {args.out}: {res.modules} modules as {args.to}{kept}")

    return run_tool("convert", go)
