"""`lora-engine convert FILE -o OUT --to kohya|peft|diffusers|comfyui`: between kohya/LyCORIS safetensors,
PEFT adapter folders and diffusers LoRA files (bit-exact round trips for LoRA modules); Flux.1/Chroma/SD3
LoRAs between kohya, diffusers and ComfyUI-native names (fused layers split or stacked exactly)."""
from __future__ import annotations

from .tool_common import add_overwrite, claim_output


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert LoRAs between kohya and PEFT/diffusers formats")
    p.add_argument("file", metavar="FILE", help="LoRA file or PEFT folder")
    p.add_argument("-o", "--out", required=True, help="output file (kohya, diffusers) or folder (peft)")
    p.add_argument("--to", required=True, choices=["kohya", "peft", "diffusers", "comfyui"],
                   help="comfyui: diffusion_model.<native name> keys (Flux.1, Chroma, SD3)")
    p.add_argument("--reference", metavar="MODEL", help="model folder or checkpoint giving module paths (needed "
                   "for sgm-named SDXL UNet keys and transformers>=5 text encoders) or a Flux/SD3 model's row layout "
                   "(needed where the LoRA does not tell, e.g. an SD3 model whose width is not 64 x depth)")
    add_overwrite(p)
    p.set_defaults(func=run, cancelled="nothing written")


def run(args) -> int:
    from ...tools.convert import convert

    claim_output(args.out, args.overwrite)
    res = convert(args.file, args.out, args.to, reference=args.reference, overwrite=args.overwrite)
    kept = f" ({res.kept_as_is} LyCORIS modules kept as they are)" if res.kept_as_is else ""
    for w in res.warnings:
        print(f"note: {w}")
    print(f"wrote {args.out}: {res.modules} modules as {args.to}{kept}")
    return 0
