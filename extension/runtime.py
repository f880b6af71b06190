"""One engine per loaded checkpoint, and the runtime factors that make per-step and per-image LoRAs cheap.

``ModelRuntime(sd_model)`` builds the key map from the model's own parameter names (A1111's
ldm/sgm names, with or without the hijack's ``.wrapped`` level) and holds a ``LoraEngine``.

``apply(batch, mode)`` puts a batch's stack on the model:

- merged: the deltas are written into the weights (only changed slots); per-image and negative
  tags cannot be merged, so the first image's positive stack is used (A1111's behaviour) with a
  warning; ``start``/``stop`` re-merge only the UNet slots of the LoRA that switches;
- on the fly: every variant of the batch is hooked once; what each image, prompt and step sees is a
  runtime factor ``f`` per variant (``y = W x + Σ m·f·ΔW x``): a scalar while the text encoder
  runs (set per prompt by a forward pre-hook on the text encoder), a vector over the rows of the
  denoiser batch while the UNet runs (set per step by the cfg-denoiser callback, sliced per UNet
  call by a forward pre-hook, since A1111 may call the UNet on slices of the batch).

Denoiser rows (A1111 ``CFGDenoiser.forward``): for each image i, ``repeats[i]`` cond rows (one per
``AND`` part), then one uncond row per image.
"""
from __future__ import annotations

import dataclasses
import logging
import re

import torch

from lora_engine.engine import LoraEngine, Mode as EngineMode, has_quantized_weights
from lora_engine.errors import LoraEngineError

from .batch import BatchStacks


log = logging.getLogger("lora_engine")
_AND_RE = re.compile(r"\bAND\b")


def denoiser_rows(n_rows: int, positives: tuple[str, ...]) -> list[tuple[int, bool]]:
    """``(image, is_uncond)`` for each row of the denoiser batch (``n_rows`` rows, B images)."""
    b = len(positives)
    if b == 0:
        return []
    cond = n_rows - b
    repeats = [1] * b
    if cond != b:
        counted = [len(_AND_RE.split(p)) for p in positives]
        repeats = counted if sum(counted) == cond else [max(1, cond // b)] * b
    rows = [(i, False) for i, n in enumerate(repeats) for _ in range(n)]
    rows += [(i, True) for i in range(b)]
    if len(rows) != n_rows:  # unknown layout (edit models, skipped uncond...): cycle over the images
        rows = [(k % b, k >= cond) for k in range(n_rows)]
    return rows


def _unet_module(sd_model):
    return getattr(getattr(sd_model, "model", None), "diffusion_model", None)


def _te_module(sd_model):
    return getattr(sd_model, "conditioner", None) or getattr(sd_model, "cond_stage_model", None)


def _texts(args) -> list | None:
    if not args:
        return None
    a = args[0]
    if isinstance(a, dict):
        a = a.get("txt")
    return a if isinstance(a, list) else None


class ModelRuntime:
    def __init__(self, sd_model, backup_device: str = "cpu"):
        self.sd_model = sd_model
        # --lowvram / --medvram (A1111 marks the model ``lowvram``): leave the LoRA tensors in host memory
        # rather than holding a copy on the GPU while they are in the stack
        self.engine = LoraEngine.for_model(sd_model, mode=EngineMode.MERGED, backup_device=backup_device,
                                           device_factors=not getattr(sd_model, "lowvram", False))
        self.batch: BatchStacks | None = None
        self.merged_first_image = False
        self.notes: list[str] = []
        self._rows: dict[str, torch.Tensor] = {}
        self._cursor = 0
        self._handles = []
        self._merged_active: tuple | None = None

    def quantized(self) -> bool:
        """Whether the model holds quantized weights now (A1111's FP8 weight option can be toggled)."""
        return has_quantized_weights(self.sd_model)

    # ---- applying a batch -------------------------------------------------------------------
    def apply(self, batch: BatchStacks, mode: EngineMode) -> list[str]:
        """Put ``batch`` on the model in ``mode``; returns warnings (unmatched keys, merged limits).
        When the stack cannot be applied (a LoRA's math fails on this model) the model and this
        runtime keep their last good state and the one-line reason is the only warning."""
        notes = []
        merged_first_image = mode is EngineMode.MERGED and not batch.uniform and bool(batch.variants)
        if merged_first_image:
            notes.append("merged mode applies the first image's prompt LoRAs to the whole batch; "
                         "per-image and negative-prompt LoRAs need 'on the fly' or 'automatic' mode")
        previous, previous_mode = self.engine.stack, self.engine.mode
        try:
            if mode is not self.engine.mode:
                self.engine.restore()
                self.engine.set_mode(mode)
            self.engine.set_stack(_merged_stack(batch, 0, 1) if mode is EngineMode.MERGED else batch.stack())
        except LoraEngineError as e:
            if self.engine.mode is not previous_mode:  # the last good stack, in its mode (it applied before)
                self.engine.set_mode(previous_mode)
                self.engine.set_stack(previous)
            return [f"{e}; this generation keeps the LoRAs of the last one that applied"]
        self._remove_hooks()
        self.notes = notes
        self.batch = batch
        self._merged_active = None
        self.merged_first_image = merged_first_image
        if mode is EngineMode.ONTHEFLY:
            for v in batch.variants:
                self.engine.set_factor(v.ident, 1.0)
            if not batch.uniform:
                self._install_hooks()
                self.notes.extend(batch.te_conflicts())
        return self.notes + self.engine.warnings()

    def clear(self) -> None:
        """Remove every LoRA effect (weights restored bit-exactly, hooks removed)."""
        self._remove_hooks()
        self.engine.restore()
        self.batch = None

    def drop(self) -> None:
        """The checkpoint's weights were reloaded under us: remove hooks, forget merged backups
        (they hold the previous weights) without writing them back."""
        self._remove_hooks()
        if self.engine.mode is EngineMode.ONTHEFLY:
            self.engine.restore()
        self.batch = None

    # ---- steps -------------------------------------------------------------------------------
    def on_step(self, step_index: int, total_steps: int, n_rows: int) -> None:
        """Before each denoiser call: set the factors of this step for the whole denoiser batch."""
        b = self.batch
        if b is None or not b.variants:
            return
        if self.engine.mode is EngineMode.MERGED:
            if b.scheduled:
                active = tuple((v.ident, v.unet_on(0, False, step_index, total_steps)) for v in b.variants)
                if active != self._merged_active:
                    self._merged_active = active
                    try:
                        self.engine.set_stack(_merged_stack(b, step_index, total_steps))
                    except LoraEngineError as e:  # the weights stay at the previous step's stack
                        log.warning("lora-engine: %s", e)
            return
        if b.uniform:
            return
        rows = denoiser_rows(n_rows, b.positives)
        self._rows = {v.ident: torch.tensor([1.0 if v.unet_on(i, unc, step_index, total_steps) else 0.0
                                             for i, unc in rows]) for v in b.variants}
        self._cursor = 0
        for ident, vec in self._rows.items():
            self.engine.set_factor(ident, _scalar_or(vec))

    def _unet_pre_hook(self, module, args):
        if not self._rows or not args or not isinstance(args[0], torch.Tensor):
            return None
        n = args[0].shape[0]
        total = len(next(iter(self._rows.values())))
        if self._cursor + n > total:
            self._cursor = 0
        a, self._cursor = self._cursor, self._cursor + n
        for ident, vec in self._rows.items():
            self.engine.set_factor(ident, _scalar_or(vec[a:a + n]))
        return None

    # ---- text encoder --------------------------------------------------------------------------
    def _te_pre_hook(self, module, args):
        b = self.batch
        texts = _texts(args)
        if b is None or texts is None:
            return None
        negative = bool(getattr(texts, "is_negative_prompt", False))
        image = self._image_of(texts, b.negatives if negative else b.positives)
        self._rows = {}
        for v in b.variants:
            self.engine.set_factor(v.ident, 1.0 if v.te_on(image, negative) else 0.0)
        return None

    def _image_of(self, texts: list, prompts: tuple[str, ...]) -> int:
        """Which image a text-encoder call belongs to: the prompt equal to one of its texts (exactly,
        then up to whitespace); else the only prompt containing it (an ``AND`` part, a scheduled
        variant); else image 0, with a note."""
        for norm in (str, _squash):
            wanted = [norm(p) for p in prompts]
            for t in texts:
                if norm(t) in wanted:
                    return wanted.index(norm(t))
        for t in texts:
            holders = {i for i, p in enumerate(prompts) if _squash(t) and _squash(t) in _squash(p)}
            if len(holders) == 1:
                return holders.pop()
        note = "a text-encoder call matched no prompt of the batch; the first image's LoRAs were used for it"
        if note not in self.notes:
            self.notes.append(note)
        return 0

    # ---- hooks ---------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        unet, te = _unet_module(self.sd_model), _te_module(self.sd_model)
        if unet is not None:
            self._handles.append(unet.register_forward_pre_hook(self._unet_pre_hook))
        if te is not None:
            self._handles.append(te.register_forward_pre_hook(self._te_pre_hook))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._rows = {}

    def state(self) -> dict:
        b = self.batch
        return {"mode": self.engine.mode.value, "architecture": self.engine.keymap.architecture,
                "applied": [] if b is None else [
                    {"name": v.mentioned, "te": v.entry.te, "unet": v.entry.unet, "dyn": v.entry.dyn,
                     "images": sorted({u.image for u in v.uses}),
                     "negative": any(u.negative for u in v.uses)} for v in b.variants],
                "merged_slots": len(getattr(self.engine._patcher, "backups", {})),
                "hooked_modules": len(getattr(self.engine._patcher, "hooks", {}))}


def _merged_stack(batch: BatchStacks, step_index: int, total_steps: int) -> list:
    """Image 0's positive stack; a LoRA outside its steps keeps its TE part and drops its UNet part."""
    out = []
    for v in batch.variants:
        if not any(u.image == 0 and not u.negative for u in v.uses):
            continue
        on = v.unet_on(0, False, step_index, total_steps)
        out.append(v.entry if on else dataclasses.replace(v.entry, unet=0.0))
    return out


def _squash(text) -> str:
    return " ".join(str(text).split())


def _scalar_or(vec: torch.Tensor):
    if vec.numel() == 0:
        return 1.0
    first = float(vec[0])
    return first if bool((vec == first).all()) else vec
