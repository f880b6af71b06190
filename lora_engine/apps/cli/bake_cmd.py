"""`lora-engine bake CHECKPOINT --lora FILE[:TE[:UNET]]… -o OUT`: base + Σ deltas as a new checkpoint
(single-file ldm/sgm or Flux/SD3 (BFL/ComfyUI) safetensors, or diffusers folder), streamed tensor by tensor,
written atomically."""
from __future__ import annotations

from ...syntax.file_weights import split_weights
from .tool_common import add_device, add_overwrite, add_threads, Bar, claim_output


def register(sub) -> None:
    p = sub.add_parser("bake", help="bake LoRAs into a checkpoint (single-file .safetensors or diffusers folder)")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:TE[:UNET]]",
                   help="LoRA and strengths: one number sets both, two set text encoder then UNet/transformer "
                   "(default 1)")
    p.add_argument("-o", "--out", required=True, help="output file or folder (must not be the input)")
    add_overwrite(p)
    p.add_argument("--force", action="store_true",
                   help="bake a LoRA made for another model family anyway (only its modules whose names and "
                        "shapes fit); without it such a LoRA is left out with the diagnosis")
    p.add_argument("--quiet", action="store_true")
    add_device(p)
    add_threads(p)
    p.set_defaults(func=run, cancelled="nothing written")


def parse_lora(spec: str):
    from ...tools.bake import BakeLora

    path, nums = split_weights(spec, 2)
    te = nums[0] if nums else 1.0
    unet = nums[1] if len(nums) > 1 else te
    return BakeLora(path, te, unet)


def run(args) -> int:
    from ...tools.bake import bake

    claim_output(args.out, args.overwrite)
    loras = [parse_lora(s) for s in args.lora]
    with Bar("bake", args.quiet) as bar:
        res = bake(args.checkpoint, loras, args.out, overwrite=args.overwrite, device=args.device, progress=bar,
                   force=args.force)
    for w in res.warnings:
        print(f"warning: {w}")
    print(f"wrote {args.out}: {res.touched} tensors changed, {res.copied} copied unchanged")
    return 0
