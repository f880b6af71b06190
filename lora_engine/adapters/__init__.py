"""Adapter types and the registry that picks one from a module's tensor roles.

Each type declares the roles that identify it; detection follows LyCORIS's order.
``build_adapter`` consumes roles and returns the leftovers, so nothing is dropped silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Delta, LowRankFactors
from .dora import DoRA
from .full import Full
from .glora import GLoRA
from .ia3 import IA3
from .lokr import LoKr
from .loha import LoHa
from .lora import LoRA
from .norm import Norm
from .oft import OFT
from .set_weight import SetWeight

__all__ = ["Delta", "LowRankFactors", "LoRA", "LoHa", "LoKr", "IA3", "GLoRA", "Full", "Norm", "OFT", "DoRA", "SetWeight",
           "build_adapter", "check_roles", "AlphaSpec"]


@dataclass(frozen=True)
class AlphaSpec:
    """Where α comes from when the file has no ``alpha`` tensor (PEFT config / diffusers metadata)."""

    alpha: float | None = None
    rslora: bool = False


def _scale(roles: dict, rank: int | None, ext: AlphaSpec) -> float:
    """s = scale key, else α/r (α/√r for rsLoRA); a missing α means α = r."""
    if "scale" in roles:
        return float(roles.pop("scale").float().item())
    alpha_t = roles.pop("alpha", None)
    if rank is None or rank == 0:
        return 1.0
    if alpha_t is not None:
        return float(alpha_t.float().item()) / rank
    if ext.alpha is not None:
        return ext.alpha / (math.sqrt(rank) if ext.rslora else rank)
    return 1.0


def _lora(r: dict, ext: AlphaSpec):
    """A ``diff_b`` next to the factors (Wan files) is a bias delta taken as it is, Δb = diff_b, as ComfyUI and
    diffusers (``lora_B.bias`` after folding α/r into the factors) apply it: held as ``up_bias`` = diff_b / s."""
    a = LoRA(down=r.pop("down"), up=r.pop("up"), scale=0.0, mid=r.pop("mid", None), up_bias=r.pop("up_bias", None))
    scale = _scale(r, a.rank, ext)
    up_bias = a.up_bias
    if up_bias is None and "diff_b" in r and scale != 0.0:
        up_bias = r.pop("diff_b").float() / scale  # fp32: s · (diff_b / s) is diff_b within an ulp
    return LoRA(a.down, a.up, scale, a.mid, up_bias)


def _loha(r: dict, ext: AlphaSpec):
    w1a, w1b, w2a, w2b = (r.pop(k) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    return LoHa(w1a, w1b, w2a, w2b, _scale(r, int(w1b.shape[0]), ext), r.pop("hada_t1", None), r.pop("hada_t2", None))


def _lokr(r: dict, ext: AlphaSpec):
    parts = {k: r.pop(k, None) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}
    a = LoKr(parts["lokr_w1"], parts["lokr_w1_a"], parts["lokr_w1_b"], parts["lokr_w2"], parts["lokr_w2_a"],
             parts["lokr_w2_b"], 1.0, parts["lokr_t2"])
    if a.rank is None:  # both factors full: α ignored
        r.pop("alpha", None)
        scale = float(r.pop("scale").float().item()) if "scale" in r else 1.0
    else:
        scale = _scale(r, a.rank, ext)
    return LoKr(a.w1, a.w1a, a.w1b, a.w2, a.w2a, a.w2b, scale, a.t2)


def _ia3(r: dict, ext: AlphaSpec):
    r.pop("alpha", None)
    return IA3(r.pop("weight"), bool(int(r.pop("on_input").flatten()[0].item())))


def _glora(r: dict, ext: AlphaSpec):
    a1, a2, b1, b2 = (r.pop(k) for k in ("a1", "a2", "b1", "b2"))
    rank = int(min(a1.shape[0], a1.shape[1]))
    return GLoRA(a1, a2, b1, b2, _scale(r, rank, ext))


def _full(r: dict, ext: AlphaSpec):
    r.pop("alpha", None)
    scale = float(r.pop("scale").float().item()) if "scale" in r else 1.0
    return Full(r.pop("diff"), r.pop("diff_b", None), scale)


def _norm(r: dict, ext: AlphaSpec):
    r.pop("alpha", None)
    return Norm(r.pop("w_norm"), r.pop("b_norm", None))


def _oft(r: dict, ext: AlphaSpec):
    alpha_t = r.pop("alpha", None)
    alpha = 0.0 if alpha_t is None else float(alpha_t.float().item())
    if "oft_diag" in r:
        return OFT(r.pop("oft_diag"), 0.0, r.pop("rescale", None), is_rotation=True)
    return OFT(r.pop("oft_blocks"), alpha, r.pop("rescale", None))


def _set(r: dict, ext: AlphaSpec):
    r.pop("alpha", None)
    return SetWeight(r.pop("set_weight"))


# (identifying roles (any of), builder) in LyCORIS's detection order.
REGISTRY = [
    (("up", "down"), _lora),
    (("hada_w1_a",), _loha),
    (("on_input",), _ia3),
    (("lokr_w1", "lokr_w1_a"), _lokr),
    (("diff",), _full),
    (("w_norm",), _norm),
    (("oft_blocks", "oft_diag"), _oft),
    (("a1",), _glora),
    (("set_weight",), _set),
]


# Roles read as one number (``.item()``), and roles that are matrices or conv kernels (indexed by shape[0] and
# shape[1]). Every other role is a vector or more (at least one dimension).
SCALAR_ROLES = ("alpha", "scale", "on_input")
MATRIX_ROLES = frozenset({"down", "up", "mid", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                          "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                          "a1", "a2", "b1", "b2"})


def check_roles(roles: dict[str, torch.Tensor]) -> None:
    """``ValueError`` naming the first tensor whose number of elements or dimensions no adapter can use: a
    multi-element or empty ``alpha``, a 0-d or 1-d factor, a 0-d vector."""
    for role, t in roles.items():
        if role in SCALAR_ROLES:
            if t.numel() != 1:
                raise ValueError(f"{role} has shape {list(t.shape)}: expected a single number")
        elif t.ndim < (2 if role in MATRIX_ROLES else 1):
            raise ValueError(f"{role} has shape {list(t.shape)}: expected "
                             + ("a matrix or conv kernel" if role in MATRIX_ROLES else "at least one dimension"))


def build_adapter(roles: dict[str, torch.Tensor], ext: AlphaSpec = AlphaSpec(), dora_axis: int | None = None):
    """Pick and build the adapter for one module. Returns ``(adapter, leftover_roles)``.

    Raises ``ValueError`` (with a short reason) when the tensors are incomplete, malformed (:func:`check_roles`)
    or do not chain. Any other exception from a builder on tensors that passed those checks is reported the
    same way, so a malformed file never lets a torch/indexing error out.
    """
    check_roles(roles)
    r = dict(roles)
    for ident, builder in REGISTRY:
        if ident == ("up", "down"):
            hit = "up" in r or "down" in r
            if hit and not ("up" in r and "down" in r):
                raise ValueError("has only one of up/down")
        else:
            hit = any(k in r for k in ident)
        if not hit:
            continue
        kind = builder.__name__[1:]
        try:
            adapter = builder(r, ext)
            adapter.check()
            if "dora_scale" in r:
                adapter = DoRA(adapter, r.pop("dora_scale"), dora_axis)
        except KeyError as e:
            raise ValueError(f"incomplete {kind} tensors (missing {e.args[0]})") from None
        except ValueError:
            raise
        except (ArithmeticError, IndexError, RuntimeError, TypeError) as e:
            why = (str(e).strip().splitlines() or [""])[0][:120]
            raise ValueError(f"malformed {kind} tensors ({type(e).__name__}: {why})") from None
        return adapter, r
    raise ValueError(f"no adapter type has tensors {sorted(r)}")
