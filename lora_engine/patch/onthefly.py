"""On-the-fly mode: forward hooks on the touched modules only; weights are never written.

Linear/Conv2d targets:
    y = base(x) + Σ_k m_k · f_k · s_k · up_k(mid_k(down_k(x)))      (low-rank types: LoRA, LoCon, Tucker)
    y = base(x) + Σ_k m_k · f_k · (ΔW_k ⋆ x + Δb_k)                 (other types: dense ΔW computed once, cached)
where m_k is the plan's strength and f_k a runtime factor per LoRA (``set_factor``): a scalar, or
a vector with one value per sample of the batch, so images of one batch can carry different
stacks and step schedules change nothing but a number.
Other targets (fused ``in_proj_weight`` of nn.MultiheadAttention, norm layers, Conv3d, bare parameters) get the summed
dense delta (and Δb on the bias) swapped in for the duration of the forward (pre-hook) and the original Parameter
put back right after (post-hook); the stored weight is never modified. Those take a scalar factor.
Quantized layers (fp8, scaled fp8, GGUF, bitsandbytes 4-bit: ``lora_engine.quant``) run their own
forward untouched; a low-rank side path never reads their weight, a dense ΔW is computed once from the
dequantized weight (fp32, dropped after) and kept in the compute dtype. A weight that cannot be read
(unknown quant type) refuses only the terms that need it, with one line naming the layer.
Installing is all or nothing: each term's math runs before any hook changes (a broken adapter fails in
``apply``, never inside a forward), and a failure puts every hook back as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..errors import LoraEngineError, PatchError
from ..adapters.lora import LoRA
from ..adapters.set_weight import multiplier
from ..finite import nonfinite
from ..quant import QuantError, is_quantized, logical_shape, quant_weight_at
from .delta import summed_delta
from .device_factors import DeviceFactors, plan_adapters
from .lowrank_side import FusedLowRank
from .merged import _param
from .plan import Contribution, PatchPlan, changed_slots, failure_line, keeping, refuse
from .rows import place_rows


def _as_factor(f, out: torch.Tensor) -> torch.Tensor | float:
    if isinstance(f, (int, float)):
        return float(f)
    f = f.to(device=out.device, dtype=out.dtype)
    if f.numel() == 1:
        return f.reshape(())
    if f.shape[0] != out.shape[0]:
        raise LoraEngineError(f"per-sample multipliers for {f.shape[0]} samples, but the batch has {out.shape[0]}")
    return f.reshape(-1, *([1] * (out.ndim - 1)))


@dataclass
class _Term:
    contribution: Contribution
    target: object
    cache: dict = field(default_factory=dict)  # (dtype, device) -> prepared tensors


class _ModuleHook:
    """All on-the-fly terms of one module, and its torch hook handles."""

    def __init__(self, patcher: "OnTheFlyPatcher", path: str, module: torch.nn.Module):
        self.patcher, self.path, self.module = patcher, path, module
        self.terms: dict[str, list[_Term]] = {}  # slot -> terms
        self.handles = []
        self.swapped: dict[str, tuple] = {}
        self.fused_cache: dict = {}  # rebuilt after any change of terms
        if not patcher.suspended:
            self.attach()

    def attach(self) -> None:
        """Register the torch hooks (again, after ``remove``); terms and built side paths are kept."""
        if self.handles:
            return
        module = self.module
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            self.handles.append(module.register_forward_hook(self._add_hook))
        else:
            self.handles.append(module.register_forward_pre_hook(self._swap_in))
            self.handles.append(module.register_forward_hook(self._swap_out))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def prepare(self, term: _Term) -> str | None:
        """Do the term's math before it is hooked, so a broken adapter fails here and not inside a
        forward: a dense ΔW is computed now (and kept for the layer's dtype), a low-rank term's side
        path factors are built. Returns why the term must not be used (what the side path would
        multiply by is not finite in the layer's dtype), or None."""
        c = term.contribution
        unit = Contribution(c.lora_id, c.module_name, 1.0, c.adapter)
        layer = isinstance(self.module, (torch.nn.Linear, torch.nn.Conv2d))
        if layer and self._is_lowrank(term):  # the weight is not read (a quantized one is never dequantized)
            stored = _param(self.patcher.root, term.target.weight_key)
            dtype = stored.dtype if stored.is_floating_point() and not is_quantized(stored) else torch.float32
            f = c.adapter.factors()
            m = f.scale * c.strength
            parts = (f.up * m, f.down, f.mid, None if f.bias is None else f.bias * m)
            return _why_not_finite(parts, dtype)
        try:
            w = self.patcher.original(term.target)
        except QuantError as e:
            return str(e)
        dtype = w.dtype if w.is_floating_point() else torch.float32
        if layer:
            dw, db = summed_delta([unit], w)
            term.cache[(dtype, w.device)] = (dw.to(device=w.device, dtype=dtype),
                                             None if db is None else db.to(device=w.device, dtype=dtype))
            parts = (c.strength * dw, None if db is None else c.strength * db)
        else:
            dw, db = term.cache["swap"] = summed_delta([unit], w)
            parts = (c.strength * dw, None if db is None else c.strength * db)
        return _why_not_finite(parts, dtype)

    # ---- Linear / Conv2d: add the side path ---------------------------------------------------
    def _lowrank(self, term: _Term, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        prep = term.cache.get(key)
        m = self.module
        if prep is None:
            f = term.contribution.adapter.factors()
            r = f.down.shape[0]
            if isinstance(m, torch.nn.Linear):
                down, up = f.down.reshape(r, -1), f.up.reshape(f.up.shape[0], -1)
                mid = None
            else:
                up = f.up.reshape(f.up.shape[0], -1, 1, 1)
                mid = f.mid
                down = f.down if f.down.ndim == 4 else f.down.reshape(r, -1, 1, 1)
            prep = tuple(None if t is None else t.to(device=x.device, dtype=x.dtype) for t in (down, mid, up, f.bias))
            prep = prep + (f.scale,)
            term.cache[key] = prep
        down, mid, up, bias, scale = prep
        if isinstance(m, torch.nn.Linear):
            h = F.linear(F.linear(x, down), up)
        elif mid is None:
            h = F.conv2d(F.conv2d(x, down, None, m.stride, m.padding, m.dilation), up)
        else:
            h = F.conv2d(F.conv2d(F.conv2d(x, down), mid, None, m.stride, m.padding, m.dilation), up)
        if bias is not None:
            h = h + (bias.view(1, -1, 1, 1) if h.ndim == 4 else bias)
        return h * scale

    def _dense(self, term: _Term, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        prep = term.cache.get(key)
        m = self.module
        if prep is None:
            base = self.patcher.original(term.target)
            single = Contribution(term.contribution.lora_id, term.contribution.module_name, 1.0,
                                  term.contribution.adapter)
            dw, db = summed_delta([single], base)
            prep = (dw.to(device=x.device, dtype=x.dtype), None if db is None else db.to(device=x.device, dtype=x.dtype))
            term.cache[key] = prep
        dw, db = prep
        if isinstance(m, torch.nn.Linear):
            return F.linear(x, dw, db)
        return F.conv2d(x, dw, db, m.stride, m.padding, m.dilation, m.groups)

    def _is_lowrank(self, term: _Term) -> bool:
        a = term.contribution.adapter
        if not isinstance(a, LoRA):
            return False
        m = self.module
        if isinstance(m, torch.nn.Conv2d):
            if m.groups != 1:
                return False
            k = tuple(m.kernel_size)
            if a.mid is not None:
                return tuple(a.mid.shape[2:]) == k
            return a.down.ndim == 4 and tuple(a.down.shape[2:]) == k or (k == (1, 1))
        return True

    def _fusable(self, term: _Term) -> bool:
        a = term.contribution.adapter
        return self._is_lowrank(term) and a.mid is None and a.up_bias is None

    def _fused_for(self, x: torch.Tensor):
        """(the fused side path or None, the terms it does not cover), per (dtype, device)."""
        key = (x.dtype, x.device)
        entry = self.fused_cache.get(key)
        if entry is None:
            all_terms = [t for ts in self.terms.values() for t in ts]
            terms = [t for t in all_terms if self._fusable(t)]
            contribs = [self.patcher.on_device(t.contribution, x.device) for t in terms]
            fused = FusedLowRank(contribs, self.module, x.dtype, x.device) \
                if terms and FusedLowRank.compatible(contribs, self.module) else None
            rest = [t for t in all_terms if fused is None or not self._fusable(t)]
            entry = self.fused_cache[key] = (fused, [(t, self._is_lowrank(t)) for t in rest])
        return entry

    def _add_hook(self, module, args, out):
        x = args[0]
        fused, rest = self._fused_for(x)
        if fused is not None:
            out = fused(x, out, [self.patcher.factor_on(i, x.device, x.dtype) for i in fused.lora_ids], module,
                        self.patcher.factor_version)
        for term, lowrank in rest:
            factor = self.patcher.factor_on(term.contribution.lora_id, x.device, x.dtype)
            if isinstance(factor, float) and factor == 0.0:
                continue
            side = self._lowrank(term, x) if lowrank else self._dense(term, x)
            a = term.contribution.adapter
            if getattr(a, "absolute", False):  # a set-weight: full effect wherever the factor is not 0
                factor = multiplier(a, factor) if isinstance(factor, float) else (factor != 0).to(factor.dtype)
            out = out + side * (multiplier(a, term.contribution.strength) * _as_factor(factor, side))
        return out

    # ---- anything else: swap a dense patched tensor in for one forward -------------------------
    def _swap_in(self, module, args):
        by_key: dict[str, list] = {}
        for slot_terms in self.terms.values():
            for term in slot_terms:
                by_key.setdefault(term.target.weight_key, []).append(term)
        for key, terms in by_key.items():
            owner, name, original = self._owned(key)
            patched = original.detach().float().clone()
            bias_key = terms[0].target.bias_key
            patched_b = None
            # set-weights first (the region takes their value exactly), then the additive terms
            for term in sorted(terms, key=lambda t: not getattr(t.contribution.adapter, "absolute", False)):
                factor = self.patcher.factor(term.contribution.lora_id)
                if not isinstance(factor, float):
                    if factor.numel() != 1 and not bool((factor == factor.flatten()[0]).all()):
                        raise LoraEngineError(f"{self.path}: per-sample multipliers are not supported on this layer")
                    factor = float(factor.flatten()[0])
                t = term.target
                region = patched if t.rows is None else patched[t.rows[0]:t.rows[1]]
                swap = term.cache.get("swap")
                if swap is None:  # the weight is never written, so ΔW(W) is computed once
                    c = term.contribution
                    unit = Contribution(c.lora_id, c.module_name, 1.0, c.adapter)
                    swap = term.cache["swap"] = summed_delta([unit], self.patcher.original(t))
                a = term.contribution.adapter
                if getattr(a, "absolute", False):
                    if multiplier(a, factor * term.contribution.strength):
                        region.copy_(a.value.reshape(region.shape))
                    continue
                dw, db = swap
                region += (factor * term.contribution.strength) * dw.to(region.device)
                if db is not None and bias_key is not None:  # Δb of a norm, a Conv3d, ... swapped in alike
                    if patched_b is None:
                        patched_b = self._owned(bias_key)[2].detach().float().clone()
                    region_b = patched_b if t.rows is None else patched_b[t.rows[0]:t.rows[1]]
                    region_b += (factor * term.contribution.strength) * db.to(region_b.device).reshape(region_b.shape)
            self._swap(key, patched)
            if patched_b is not None:
                self._swap(bias_key, patched_b)

    def _owned(self, key: str):
        owner_path, _, name = key.rpartition(".")
        owner = self.patcher.root.get_submodule(owner_path)
        return owner, name, owner._parameters[name]

    def _swap(self, key: str, patched: torch.Tensor) -> None:
        owner, name, original = self._owned(key)
        self.swapped[key] = (owner, name, original)
        owner._parameters[name] = patched.to(original.dtype)

    def _swap_out(self, module, args, out):
        for owner, name, original in self.swapped.values():
            owner._parameters[name] = original
        self.swapped = {}
        return out


def _why_not_finite(parts, dtype) -> str | None:
    if any(nonfinite(p.to(dtype)) for p in parts if p is not None):
        return "the side path's factors are not finite"
    return None


def hook_path(root: torch.nn.Module, weight_key: str) -> str:
    """The module whose forward sees this weight. nn.MultiheadAttention reads its ``out_proj``
    weight directly (the Linear's forward never runs), so its hook goes on the attention module."""
    path = weight_key.rpartition(".")[0]
    parent = path.rpartition(".")[0]
    if path.endswith("out_proj") and isinstance(root.get_submodule(parent), torch.nn.MultiheadAttention):
        return parent
    return path


def _terms(module: torch.nn.Module, target, contribs) -> list[_Term]:
    """A row slice of a fused Linear/Conv weight (``to_q`` on ``qkv``) runs as a side path of the whole
    layer: its adapter placed at its rows (a LoRA's up factor padded with zero rows)."""
    if target.rows is None or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return [_Term(c, target) for c in contribs]
    shape = logical_shape(module.weight)
    height = shape[0]
    whole = replace(target, rows=None, shape=shape)
    return [_Term(replace(c, adapter=place_rows(c.adapter, target.rows, height)), whole) for c in contribs]


class OnTheFlyPatcher:
    def __init__(self, root: torch.nn.Module, device_factors: bool = True):
        self.root = root
        self.plan = PatchPlan()
        self.hooks: dict[str, _ModuleHook] = {}
        self.factors: dict[str, float | torch.Tensor] = {}
        self.factor_version = 0  # bumped by set_factor: side paths rebuild their ρ only then
        self._factors_on: dict[tuple, torch.Tensor] = {}  # (lora id, device, dtype) -> the factor there
        self.device_factors = device_factors
        self.adapters_on_device = DeviceFactors()  # adapters moved once to a GPU model's device
        self.suspended = False

    def suspend(self) -> None:
        """Take the hooks off the modules (the model runs as if unpatched) but keep the plan, the terms and
        their built side paths, so ``resume`` costs nothing (a host that attaches the LoRAs per run)."""
        self.suspended = True
        for hook in self.hooks.values():
            hook.remove()

    def resume(self) -> None:
        self.suspended = False
        for hook in self.hooks.values():
            hook.attach()

    def on_device(self, contribution: Contribution, device: torch.device) -> Contribution:
        """The contribution with its adapter's tensors on ``device`` (kept there while in the plan)."""
        if not self.device_factors or device.type == "cpu":
            return contribution
        return replace(contribution, adapter=self.adapters_on_device.get(contribution.adapter, device))

    def factor(self, lora_id: str):
        return self.factors.get(lora_id, 1.0)

    def factor_on(self, lora_id: str, device: torch.device, dtype: torch.dtype):
        """The factor as a float, or its per-sample tensor on ``device`` in ``dtype``: converted once per
        ``set_factor``, not in every hooked layer (on a GPU each host-to-device copy waits for the queue)."""
        f = self.factors.get(lora_id, 1.0)
        if isinstance(f, float) or (f.device == device and f.dtype == dtype):
            return f
        key = (lora_id, device, dtype)
        on = self._factors_on.get(key)
        if on is None:
            on = self._factors_on[key] = f.to(device=device, dtype=dtype)
        return on

    def set_factor(self, lora_id: str, value) -> None:
        """Runtime multiplier of one LoRA (scalar, or one value per sample). No re-patching."""
        self.factors[lora_id] = value if isinstance(value, torch.Tensor) else float(value)
        self.factor_version += 1
        for key in [k for k in self._factors_on if k[0] == lora_id]:
            del self._factors_on[key]

    def original(self, target) -> torch.Tensor:
        """The target's weight as a float tensor: the stored one, or the fp32 dequantization of a
        quantized one (a transient copy: callers keep only what they compute from it)."""
        w = _param(self.root, target.weight_key).detach()
        if is_quantized(w):
            return quant_weight_at(self.root, target.weight_key).dequant(target.rows)
        return w if target.rows is None else w[target.rows[0]:target.rows[1]]

    def apply(self, new_plan: PatchPlan) -> int:
        """Update hooks for changed slots only; returns the number of slots updated.

        All or nothing: every term's math is done before it is hooked, and on any exception the hooks
        are put back as they were (hooks added by this call removed) and a ``PatchError`` names the
        LoRA file and module. A slot whose factors are not finite keeps its previous terms (noted in
        the LoRAs' reports)."""
        old = self.plan
        changed = sorted(changed_slots(old, new_plan))
        before: dict[str, dict | None] = {}  # module path -> its hook's terms before this call (None: no hook)
        refused: set[str] = set()
        slot, current = None, ()
        try:
            for slot in changed:
                current = ()
                target = new_plan.targets.get(slot) or old.targets[slot]
                path = hook_path(self.root, target.weight_key)
                hook = self.hooks.get(path)
                if path not in before:
                    before[path] = None if hook is None else dict(hook.terms)
                contribs = new_plan.contributions.get(slot)
                if contribs:
                    if hook is None:
                        hook = self.hooks[path] = _ModuleHook(self, path, self.root.get_submodule(path))
                    terms = _terms(hook.module, target, contribs)
                    why = None
                    for term in terms:
                        current = (term.contribution,)
                        why = hook.prepare(term)
                        if why is not None:
                            break
                    if why is not None:
                        refused.add(slot)
                        refuse(new_plan, slot, why, current)
                        continue
                    hook.terms[slot] = terms
                elif hook is not None:
                    hook.terms.pop(slot, None)
                if hook is not None:
                    hook.fused_cache = {}
        except BaseException as e:
            self._roll_back(before)
            if not isinstance(e, Exception) or slot is None:
                raise
            raise PatchError(failure_line(new_plan, slot, current or new_plan.contributions.get(slot, ()), e,
                                          f"cannot be hooked on {slot}")) from e
        for path in before:  # commit: a module left without terms loses its hook
            hook = self.hooks.get(path)
            if hook is not None and not hook.terms:
                hook.remove()
                del self.hooks[path]
        self.plan = keeping(old, new_plan, refused)
        if len(self.adapters_on_device):
            placed = [t.contribution.adapter for h in self.hooks.values() for ts in h.terms.values() for t in ts]
            self.adapters_on_device.retain(plan_adapters(self.plan) + placed)
        return len(changed)

    def _roll_back(self, before: dict) -> None:
        for path, terms in before.items():
            hook = self.hooks.get(path)
            if hook is None:
                continue
            if terms is None:
                hook.remove()
                del self.hooks[path]
            else:
                hook.terms = terms
                hook.fused_cache = {}

    def restore(self) -> None:
        for hook in self.hooks.values():
            hook.remove()
        self.hooks = {}
        self.plan = PatchPlan()
        self.adapters_on_device.clear()
