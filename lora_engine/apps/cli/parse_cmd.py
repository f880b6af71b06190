"""`lora-engine parse "PROMPT" [--json]`: the cleaned prompt, each LoRA reference, the warnings."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("parse", help="parse <lora:…> tags out of a prompt (A1111 + lora-block-weight syntax)")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _describe(tag) -> str:
    lines = [f"  {tag.kind} {tag.name!r}: te={tag.te} unet={tag.unet}" + (f" dyn={tag.dyn}" if tag.dyn else "")]
    if tag.lbw is not None:
        vals = " ".join(f"{b}={v.text()}" for b, v in zip(tag.lbw.ids, tag.lbw.values))
        lines.append(f"    blocks ({tag.lbw.source}, {tag.lbw.length} values): {vals}")
    if tag.lbwe is not None:
        lines.append(f"    elemental {tag.lbwe}: {len(tag.elements)} directive(s)")
    if tag.x is not None:
        lines.append(f"    x={tag.x}")
    if tag.start is not None or tag.stop is not None:
        fmt = lambda p: "-" if p is None else (f"{p.value:.0%} of steps" if p.is_fraction else f"step {int(p.value)}")
        lines.append(f"    from {fmt(tag.start)} until {fmt(tag.stop)}")
    return "\n".join(lines)


def run(args) -> int:
    from ...syntax.prompt import parse_prompt

    parsed = parse_prompt(args.prompt)
    if args.json:
        print(json.dumps({"prompt": parsed.cleaned_text, "tags": [t.to_json() for t in parsed.tags],
                          "warnings": list(parsed.warnings)}, indent=2, ensure_ascii=False))
    else:
        print(f"prompt: {parsed.cleaned_text}")
        print(f"loras: {len(parsed.tags)}")
        for t in parsed.tags:
            print(_describe(t))
        for w in parsed.warnings:
            print(f"warning: {w}")
    return 1 if parsed.warnings else 0
