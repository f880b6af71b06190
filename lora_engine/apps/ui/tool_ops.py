"""The Tools page's operations without gradio: each takes UI values, runs the tool of
:mod:`lora_engine.tools` with a ``progress(done, total, what)`` callback and returns the text to show.

A :class:`~lora_engine.errors.LoraEngineError` becomes ``"error: <one line>"`` (nothing is written:
the tools write atomically). Weighted lists are typed one per line, ``NAME_OR_PATH[:W]``. Every
name and path goes through the context's path rule (:class:`~.context.UiContext`) before a file
is opened, and ``overwrite`` only counts where the server allows replacing files.
"""
from __future__ import annotations

import os
from typing import Callable

from ...errors import LoraEngineError, ToolError
from .context import UiContext

Progress = Callable[[int, int, str], None]
METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")


def guarded(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except LoraEngineError as e:
        return f"error: {e}"


def _recorder(progress: Progress | None):
    """Wrap ``progress`` to remember the last (done, total) for the result line."""
    last = [0, 0]

    def call(done: int, total: int, what: str) -> None:
        last[0], last[1] = done, total
        if progress is not None:
            progress(done, total, what)
    return call, last


def _optional(value) -> float | None:
    if value in (None, ""):
        return None
    return float(value)


def parse_weighted(ctx: UiContext, text: str, most: int = 1) -> list[tuple[str, list[float]]]:
    from ...syntax.file_weights import split_weights

    out = []
    for line in (text or "").splitlines():
        if line.strip():
            name, nums = split_weights(line.strip(), most)
            out.append((ctx.lora_path(name), nums))
    if not out:
        raise ToolError("no LoRA listed (one per line, NAME[:WEIGHT])")
    return out


def inspect_op(ctx: UiContext, name: str, progress: Progress | None = None) -> str:
    from ...library.summary import format_summary, summarize

    def go():
        path = ctx.lora_path(name)
        call, _ = _recorder(progress)
        call(0, 1, os.path.basename(path))
        text = format_summary(summarize(path))
        call(1, 1, os.path.basename(path))
        return text
    return guarded(go)


def resize_op(ctx: UiContext, name: str, out: str, rank: int, method: str = "fixed", param=None,
              overwrite: bool = False, progress: Progress | None = None) -> str:
    from ...tools.resize import resize_file

    def go():
        src = ctx.lora_path(name)
        dst = ctx.output_path(out, overwrite=overwrite)
        call, last = _recorder(progress)
        res = resize_file(src, dst, int(rank), method=method, param=_optional(param), progress=call)
        kept = [r.retained_fro for r in res.reports]
        lines = [f"wrote {dst}: {last[0]}/{last[1]} modules resized, dim {res.metadata.get('ss_network_dim')}",
                 f"retained Frobenius norm: mean {sum(kept) / max(len(kept), 1):.4f}, min {min(kept, default=1):.4f}"]
        lines += [f"  {r.name}: rank {r.old_rank} -> {r.new_rank}, retained {r.retained_fro:.4f}" for r in res.reports]
        return "\n".join(lines)
    return guarded(go)


def merge_op(ctx: UiContext, specs: str, out: str, rank=None, method: str = "fixed", param=None,
             overwrite: bool = False, progress: Progress | None = None) -> str:
    from ...tools.merge import merge_files

    def go():
        pairs = [(p, w[0] if w else 1.0) for p, w in parse_weighted(ctx, specs, 1)]
        dst = ctx.output_path(out, overwrite=overwrite)
        r = int(rank) if rank not in (None, "", 0) else None
        call, last = _recorder(progress)
        res = merge_files(pairs, dst, rank=r, method=method, param=_optional(param), progress=call)
        kind = "exact (concatenated ranks)" if r is None else f"SVD {method} to rank {r}"
        lines = [f"wrote {dst}: {last[0]}/{last[1]} modules merged, {kind}, dim {res.metadata.get('ss_network_dim')}"]
        lines += [f"warning: {w}" for w in res.warnings]
        if r is not None and res.reports:
            worst = min(res.reports, key=lambda x: x.retained_fro)
            lines.append(f"retained Frobenius norm: min {worst.retained_fro:.4f} ({worst.name})")
        return "\n".join(lines)
    return guarded(go)


def convert_op(ctx: UiContext, name: str, out: str, to: str, overwrite: bool = False,
               progress: Progress | None = None) -> str:
    from ...tools.convert import convert

    def go():
        src = ctx.lora_path(name)
        dst = ctx.output_path(out, "" if to == "peft" else ".safetensors", overwrite)
        res = convert(src, dst, to, overwrite=ctx.may_overwrite(overwrite), progress=_recorder(progress)[0])
        kept = f" ({res.kept_as_is} LyCORIS modules kept as they are)" if res.kept_as_is else ""
        return "\n".join([f"wrote {dst}: {res.modules} modules as {to}{kept}"] + [f"warning: {w}" for w in res.warnings])
    return guarded(go)


def extract_op(ctx: UiContext, base: str, tuned: str, out: str, rank: int, progress: Progress | None = None,
               overwrite: bool = False) -> str:
    from ...tools.extract import extract_file

    def go():
        src, tuned_src = ctx.model_path(base), ctx.model_path(tuned)
        dst = ctx.output_path(out, overwrite=overwrite)
        call, last = _recorder(progress)
        res = extract_file(src, tuned_src, dst, int(rank), progress=call)
        kept = [r.retained_fro for r in res.reports]
        return "\n".join([f"wrote {dst}: {len(kept)} modules differ ({last[0]}/{last[1]} checked); retained "
                          f"Frobenius mean {sum(kept) / max(len(kept), 1):.4f}"] + [f"warning: {w}" for w in res.warnings])
    return guarded(go)


def bake_op(ctx: UiContext, checkpoint: str, specs: str, out: str, overwrite: bool = False,
            progress: Progress | None = None) -> str:
    from ...tools.bake import BakeLora, bake

    def go():
        loras = [BakeLora(p, w[0] if w else 1.0, w[1] if len(w) > 1 else (w[0] if w else 1.0))
                 for p, w in parse_weighted(ctx, specs, 2)]
        src = ctx.model_path(checkpoint)
        dst = ctx.output_path(out, "", overwrite)
        call, last = _recorder(progress)
        res = bake(src, loras, dst, overwrite=ctx.may_overwrite(overwrite), progress=call)
        return "\n".join([f"wrote {dst}: {res.touched} tensors changed, {res.copied} copied unchanged"]
                         + [f"warning: {w}" for w in res.warnings])
    return guarded(go)
