"""The ``lora``/``lyco`` extra network: A1111 calls ``activate(p, params_list)`` for every batch (and
again before the hires pass), and ``deactivate(p)`` at the end.

``activate`` reads the batch's own prompts from ``p`` (A1111 hands over only the first prompt's
tags), strips the tags from the negative prompts before the conds are computed, applies the
stacks through the model's runtime, clears the cond cache when the text encoder changes, and
writes ``Lora hashes`` and the warnings into the output. Like A1111, weights stay patched after
``deactivate`` and the next ``activate`` moves from there (only changed weights are rewritten).
"""
from __future__ import annotations

import dataclasses
import logging

from lora_engine.syntax.infotext import lora_hashes_value, parse_lora_hashes
from lora_engine.syntax.prompt import parse_prompt

from .batch import BatchStacks, build_batch, tags_text
from .builtin import release_builtin

log = logging.getLogger("lora_engine")
HASHES_KEY = "Lora hashes"


def batch_prompts(p, params_list, hires: bool) -> tuple[list[str], list[str], bool]:
    """(prompts with tags, negative prompts, taken from p) for the images of the current batch."""
    all_pos = getattr(p, "all_hr_prompts" if hires else "all_prompts", None)
    all_neg = getattr(p, "all_hr_negative_prompts" if hires else "all_negative_prompts", None)
    if not all_pos:
        return [tags_text(params_list)], [""], False
    size = int(getattr(p, "batch_size", 1) or 1)
    start = int(getattr(p, "iteration", 0) or 0) * size
    shown = getattr(p, "hr_prompts" if hires else "prompts", None)
    n = len(shown) if shown else size
    pos = list(all_pos[start:start + n])
    neg = list(all_neg[start:start + n]) if all_neg else [""] * len(pos)
    return pos, neg, True


def add_comment(p, text: str) -> None:
    if hasattr(p, "comment"):
        p.comment(text)
    elif isinstance(getattr(p, "comments", None), dict):
        p.comments[text] = 1


class LoraNetwork:
    """Host-independent body of the extra network (``make_extra_network`` wraps it for A1111)."""

    name = "lora"

    def __init__(self, controller):
        self.controller = controller
        self.batch: BatchStacks | None = None

    def activate(self, p, params_list) -> None:
        c = self.controller
        s = c.settings()
        model = p.sd_model
        if s.handover and c.builtin is not None:
            if c.runtime is not None:
                c.runtime.clear()
            c.cond_guard.last = None
            c.builtin_dirty = True
            return c.builtin.activate(p, params_list)
        if c.builtin_dirty:  # the built-in may hold merged layers (before us, or since a handover)
            release_builtin(model)
            c.builtin_dirty = False
        hires = bool(getattr(p, "is_hr_pass", False))
        pos, neg, from_p = batch_prompts(p, params_list, hires)
        batch = build_batch(pos, neg, c.resolve)
        if from_p:
            shown = getattr(p, "hr_prompts" if hires else "prompts", None)
            if shown and len(shown) == batch.n_images:  # the texts A1111 will encode (its own tag removal)
                batch = dataclasses.replace(batch, positives=tuple(shown)).te_distinct()
                setattr(p, "hr_prompts" if hires else "prompts", list(batch.positives))
            else:
                batch = dataclasses.replace(batch, negatives=batch.te_distinct().negatives)
            self._strip_negatives(p, batch, hires)
        runtime = c.runtime_for(model)
        mode = c.modes.choose(s.mode, batch, "hires" if hires else "first", runtime.engine.mode, runtime.quantized())
        warnings = list(batch.warnings) + runtime.apply(batch, mode)
        c.cond_guard.update(p, (mode, batch.te_signature()))
        self._record(p, batch, warnings, s.warnings)
        self.batch = batch

    def deactivate(self, p) -> None:
        c = self.controller
        if c.settings().handover and c.builtin is not None:
            return c.builtin.deactivate(p)
        return None

    @staticmethod
    def _strip_negatives(p, batch: BatchStacks, hires: bool) -> None:
        attr = "hr_negative_prompts" if hires else "negative_prompts"
        if getattr(p, attr, None) is not None:
            setattr(p, attr, list(batch.negatives))
        if not hires and getattr(p, "hr_negative_prompts", None):
            # A1111 may encode the hires conds early (lowvram, first-pass conds): strip those too.
            p.hr_negative_prompts = [parse_prompt(t or "").cleaned_text for t in p.hr_negative_prompts]

    def _record(self, p, batch: BatchStacks, warnings: list[str], show: bool) -> None:
        pairs = batch.hashes()
        extra = getattr(p, "extra_generation_params", None)
        if pairs and isinstance(extra, dict):
            old = parse_lora_hashes(str(extra.get(HASHES_KEY, "")))
            extra[HASHES_KEY] = lora_hashes_value(list(old.items()) + pairs)
        warnings = list(dict.fromkeys(warnings))
        self.controller.last_warnings = warnings
        for w in warnings:
            log.warning("lora-engine: %s", w)
            if show:
                add_comment(p, f"lora-engine: {w}")


def make_extra_network(body: LoraNetwork):
    """An A1111 ``modules.extra_networks.ExtraNetwork`` delegating to ``body`` (A1111 only)."""
    from modules import extra_networks

    class LoraEngineExtraNetwork(extra_networks.ExtraNetwork):
        def __init__(self):
            super().__init__("lora")
            self.body = body

        def activate(self, p, params_list):
            self.body.activate(p, params_list)

        def deactivate(self, p):
            self.body.deactivate(p)

    return LoraEngineExtraNetwork()
