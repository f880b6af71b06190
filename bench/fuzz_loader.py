"""fuzz_loader: long seeded runs of the loader fuzz (the engine is tests/formats/loader_fuzz.py; the test suite
runs 1,200 variants of it).

Each variant is one mutation of one of five valid LoRA files (kohya, LyCORIS, diffusers, PEFT folder,
misaligned), loaded with ``load_lora``; the outcome is ``loaded``, ``LoraFileError`` or ``other`` (any other
exception, a message that is not one line naming the file, a summary that cannot be printed). The same
safetensors bytes are also opened by the reference reader (``safetensors.safe_open``) and by our container
reader. Prints, per mutation kind, the outcome counts and the agreement with the reference, then why we refuse
what the reference opens (intended extra refusals) and what the reference refuses that we open (only lone
surrogates in metadata are intended), the slowest variants, and every ``other`` with its index (re-run one with
``--only INDEX``). Exit status 1 when there is an ``other`` or an unintended acceptance.

    python bench/fuzz_loader.py [--n 20000] [--seed 16] [--only INDEX]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tests.formats.loader_fuzz import (  # noqa: E402
    KINDS, check_variant, intentional_extra_acceptance, make_bases, make_variant, run,
)


def _reason(text: str) -> str:
    """The kind of a refusal, without the tensor name or numbers in it."""
    words = text.replace("'", " ").split()
    keep = [w for w in words if not any(c.isdigit() for c in w) and "_" not in w and "." not in w][:7]
    return " ".join(keep)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="number of variants")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--only", type=int, help="run this variant index alone and print it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lora_engine").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        if args.only is not None:
            o = check_variant(make_variant(make_bases(), args.seed, args.only), folder)
            print(f"#{args.only} {o.variant.kind}/{o.variant.base} {o.variant.desc}\n  {o.result}: {o.detail}\n"
                  f"  ours opens: {o.ours_opens} {o.ours_error}\n  reference opens: {o.reference_opens}"
                  f" {o.reference_error}")
            return 0 if o.result != "other" else 1

        def progress(i, _):
            if i % 1000 == 0:
                print(f"  {i}/{args.n}", file=sys.stderr, flush=True)

        report = run(args.n, args.seed, folder, progress)
    outcomes = report.outcomes
    print(f"{args.n} variants, seed {args.seed}, {report.seconds:.1f} s ({args.n / report.seconds:.0f} variants/s)\n")
    print(report.table())
    times = sorted(o.seconds for o in outcomes)
    print(f"\nload + summary per variant: median {statistics.median(times) * 1e3:.1f} ms, "
          f"99th percentile {times[int(0.99 * (len(times) - 1))] * 1e3:.1f} ms, max {times[-1] * 1e3:.0f} ms")
    for o in sorted(outcomes, key=lambda o: -o.seconds)[:3]:
        print(f"  {o.seconds * 1e3:.0f} ms  #{o.variant.index} {o.variant.kind}/{o.variant.base} {o.variant.desc[:70]}")
    only_ref = Counter(_reason(o.ours_error) for o in outcomes if o.reference_opens and not o.ours_opens)
    print("\nthe reference opens, we refuse (intended; see lora_engine/formats/safetensors_file.py):")
    for reason, n in only_ref.most_common():
        print(f"  {n:6d}  {reason}")
    extra = report.reference_refused_we_opened()
    bad = [o for o in extra if not intentional_extra_acceptance(o)]
    print(f"\nthe reference refuses, we open: {len(extra)} (lone surrogates in metadata: "
          f"{len(extra) - len(bad)}, anything else: {len(bad)})")
    for o in bad[:20]:
        print(f"  #{o.variant.index} {o.variant.kind}/{o.variant.base} {o.variant.desc[:70]}: {o.reference_error}")
    others = report.others()
    print(f"\nother outcomes: {len(others)}")
    for o in others[:50]:
        print(f"  #{o.variant.index} {o.variant.kind}/{o.variant.base} {o.variant.desc[:70]}: {o.detail[:200]}")
    assert set(KINDS) == {o.variant.kind for o in outcomes} or args.n < len(KINDS)
    return 1 if others or bad else 0


if __name__ == "__main__":
    sys.exit(main())
