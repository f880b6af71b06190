"""A minimal stand-in for the few ComfyUI objects the nodes touch (ComfyUI cannot be installed here).

Typed after ComfyUI's own (``comfy/model_patcher.py``, ``comfy/lora.py``, ``comfy/sd.py``, read for
their signatures and semantics, no code taken):

- ``ModelPatcher(model, load_device, offload_device)`` with ``patches: {key: [(strength_patch, value,
  strength_model, offset, function), ...]}``, ``clone()`` (copies the patch lists, shares the module
  and the backup dict), ``model_state_dict(filter_prefix=None)``, ``add_patches(patches,
  strength_patch=1.0, strength_model=1.0) -> list`` (keeps only keys of its state dict; a key may be
  ``(key, (dim, start, length))``), ``patch_model(device_to=None, lowvram_model_memory=0,
  load_weights=True, force_patch_weights=False)`` (per key: back up once, fp32 working copy,
  ``calculate_weight``, round to the storage dtype, set a new Parameter), ``unpatch_model(device_to=None,
  unpatch_weights=True)`` (restore the backups);
- ``calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None)``:
  narrows ``offset``, scales by ``strength_model``, calls an adapter's ``calculate_weight(weight, key,
  strength, strength_model, offset, function, intermediate_dtype, original_weights)``, or adds a
  ``("diff", (tensor,))`` patch as ``weight += strength · diff``;
- injections (objects with ``inject(patcher)``/``eject(patcher)``, as ``comfy.patcher_extension.PatcherInjection``;
  ``set_injections(key,
  injections)``, ``inject_model()`` at the end of ``patch_model``, ``eject_model()`` first in
  ``unpatch_model``; ``clone()`` copies the lists and ``is_injected``), and ``partially_load`` /
  :func:`load_model_gpu` as ComfyUI's model management keeps a model loaded between runs: the clone of an
  already loaded model is detached without unpatching, and weights are re-patched only when the new
  clone's ``patches_uuid`` differs from the one the weights carry. ``weight_writes`` counts patched weights;
- ``CLIP`` with ``cond_stage_model``, ``patcher``, ``clone()``, ``add_patches(...)``, ``tokenize(text)``
  and ``encode_from_tokens_scheduled(tokens)`` (patches the text encoders for the encode, then
  restores them, as ComfyUI's model management does). The tokenizer is a word hash (tiny vocab).
"""
from __future__ import annotations

import uuid
import zlib

import torch
from torch import nn


def _identity(t):
    return t


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    for strength, value, strength_model, offset, function in patches:
        function = function or _identity
        whole = weight
        if offset is not None:
            weight = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if hasattr(value, "calculate_weight"):
            out = value.calculate_weight(weight, key, strength, strength_model, offset, function,
                                         intermediate_dtype, original_weights)
            weight = whole if offset is not None else out
            continue
        kind, tensors = value if len(value) == 2 else ("diff", value)
        if kind != "diff":
            raise NotImplementedError(kind)
        if strength != 0.0:
            weight += function(strength * tensors[0].to(weight.device, weight.dtype))
        weight = whole
    return weight


def _get(module: nn.Module, key: str) -> torch.Tensor:
    path, _, name = key.rpartition(".")
    return getattr(module.get_submodule(path) if path else module, name)


def _set(module: nn.Module, key: str, value: torch.Tensor) -> None:
    path, _, name = key.rpartition(".")
    setattr(module.get_submodule(path) if path else module, name, nn.Parameter(value, requires_grad=False))


class ModelPatcher:
    def __init__(self, model: nn.Module, load_device=torch.device("cpu"), offload_device=torch.device("cpu")):
        self.model = model
        self.load_device, self.offload_device = load_device, offload_device
        self.patches: dict[str, list] = {}
        self.backup: dict[str, torch.Tensor] = {}
        self.patches_uuid = uuid.uuid4()
        self.injections: dict[str, list] = {}
        self.is_injected = False
        for attr, value in (("current_weight_patches_uuid", None), ("weight_writes", 0), ("loaded_by", None)):
            if not hasattr(model, attr):
                setattr(model, attr, value)

    def clone(self) -> "ModelPatcher":
        n = ModelPatcher(self.model, self.load_device, self.offload_device)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.backup = self.backup
        n.patches_uuid = self.patches_uuid
        n.injections = {k: list(v) for k, v in self.injections.items()}
        n.is_injected = self.is_injected
        return n

    def set_injections(self, key: str, injections: list) -> None:
        self.injections[key] = injections

    def inject_model(self) -> None:
        if self.is_injected:
            return
        for injections in self.injections.values():
            for inj in injections:
                inj.inject(self)
                self.is_injected = True

    def eject_model(self) -> None:
        if not self.is_injected:
            return
        for injections in self.injections.values():
            for inj in injections:
                inj.eject(self)
        self.is_injected = False

    def model_state_dict(self, filter_prefix=None) -> dict:
        sd = self.model.state_dict()
        return {k: v for k, v in sd.items() if filter_prefix is None or k.startswith(filter_prefix)}

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0) -> list:
        known = self.model_state_dict()
        kept = set()
        for k in patches:
            key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            if key in known:
                kept.add(k)
                self.patches.setdefault(key, []).append((strength_patch, patches[k], strength_model, offset, function))
        self.patches_uuid = uuid.uuid4()
        return list(kept)

    @torch.no_grad()
    def patch_weight_to_device(self, key: str, device_to=None) -> None:
        weight = _get(self.model, key)
        if key not in self.backup:
            self.backup[key] = weight
        temp = weight.to(device=device_to or weight.device, dtype=torch.float32, copy=True)
        out = calculate_weight(self.patches[key], temp, key)
        _set(self.model, key, out.to(weight.dtype))
        self.model.weight_writes += 1

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        self.eject_model()
        if load_weights:
            for key in self.patches:
                self.patch_weight_to_device(key, device_to)
            self.model.current_weight_patches_uuid = self.patches_uuid
        self.inject_model()
        return self.model

    @torch.no_grad()
    def unpatch_model(self, device_to=None, unpatch_weights=True) -> None:
        self.eject_model()
        if unpatch_weights:
            for key, w in self.backup.items():
                _set(self.model, key, w)
            self.backup.clear()
            self.model.current_weight_patches_uuid = None

    def partially_load(self, device_to=None, extra_memory=0, force_patch_weights=False) -> None:
        """Load for a run: weights re-patched only if they carry another clone's patches."""
        self.eject_model()
        stale = self.model.current_weight_patches_uuid not in (None, self.patches_uuid)
        if stale:
            self.unpatch_model()
        self.patch_model(load_weights=stale or self.model.current_weight_patches_uuid is None)

    def detach(self, unpatch_all=True) -> None:
        self.eject_model()
        if unpatch_all:
            self.unpatch_model()


def load_model_gpu(patcher: ModelPatcher) -> None:
    """``comfy.model_management.load_models_gpu([patcher])`` for one model: another loaded clone of the same
    module tree is detached without unpatching its weights, then the patcher is (partially) loaded."""
    current = patcher.model.loaded_by
    if current is not None and current is not patcher:
        current.detach(unpatch_all=False)
    patcher.model.loaded_by = patcher
    patcher.partially_load()


class CLIP:
    def __init__(self, cond_stage_model: nn.Module, vocab: int = 64, length: int = 10):
        self.cond_stage_model = cond_stage_model
        self.patcher = ModelPatcher(cond_stage_model)
        self.vocab, self.length = vocab, length

    def clone(self) -> "CLIP":
        n = CLIP.__new__(CLIP)
        n.cond_stage_model, n.vocab, n.length = self.cond_stage_model, self.vocab, self.length
        n.patcher = self.patcher.clone()
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0) -> list:
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def tokenize(self, text: str) -> dict:
        ids = [0] + [2 + zlib.crc32(w.encode()) % (self.vocab - 2) for w in text.split()][: self.length - 2] + [1]
        return {"ids": torch.tensor([ids + [1] * (self.length - len(ids))])}

    @torch.no_grad()
    def encode_from_tokens_scheduled(self, tokens: dict) -> list:
        self.patcher.patch_model()
        try:
            cond = encode_ids(self.cond_stage_model, tokens["ids"])
        finally:
            self.patcher.unpatch_model()
        return [[cond, {"pooled_output": cond[:, -1]}]]


def encode_ids(cond_stage_model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Every encoder's last hidden state, concatenated on the feature axis (as SDXL's clip_l + clip_g);
    a T5 encoder (``t5xxl.transformer``, no ``text_model`` level) is called with the same ids."""
    outs = []
    for _, child in cond_stage_model.named_children():
        te = child.transformer
        outs.append(te.text_model(ids).last_hidden_state if hasattr(te, "text_model")
                    else te(input_ids=ids).last_hidden_state)
    return torch.cat(outs, dim=-1)
