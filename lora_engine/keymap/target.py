"""The value a key map returns: where one LoRA target lives in the host's parameters."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Target:
    """One patchable weight (or a row slice of a fused one).

    ``weight_key``/``bias_key`` are full parameter keys under the root the map was built
    from. ``rows`` is ``[start, stop)`` inside a fused weight (OpenCLIP's ``in_proj_weight``
    holds q, k, v stacked on dim 0) and applies to the bias the same way; else None.
    ``component`` is ``"unet"`` or ``"te"`` (which multiplier applies). ``shape`` is the
    shape of the (sliced) weight. ``delta_rows`` is ``[start, stop)`` of the LoRA's delta that
    this region receives, when one LoRA module spans several of the model's weights (a fused
    ``qkv`` LoRA on separate q/k/v layers) or stores rows in another order; else None.
    """

    weight_key: str
    bias_key: str | None
    rows: tuple[int, int] | None
    component: str
    shape: tuple[int, ...]
    delta_rows: tuple[int, int] | None = None  # rows of the LoRA's delta that land here (a fused LoRA split up)

    def region(self, t: torch.Tensor) -> torch.Tensor:
        """This target's rows of a weight or bias tensor (a view), or the tensor itself."""
        return t if self.rows is None else t[self.rows[0]:self.rows[1]]


class TargetMap(Protocol):
    """What a plan needs from a model's key map (``keymap.KeyMap`` and every family's map provide it):
    ``lookup`` gives the target of a LoRA module name (its dotted path when the file has one) or None,
    ``diagnose`` one line on why names matched nothing (e.g. "SDXL LoRA on an SD1.x model"),
    ``foreign_family`` the other family when the names say the LoRA was made for one."""

    def lookup(self, name: str, dotted: str | None = None) -> Target | None: ...

    def diagnose(self, unmatched_names: list[str]) -> str: ...

    def foreign_family(self, unmatched_names: list[str]) -> str | None:
        """The model family these names were made for when it is not this model's (e.g. "SDXL"), else None."""


def module_target(root, module: str, component: str) -> Target:
    """Target of the module at relative path ``module`` (it has ``module.weight``)."""
    shape = root.shapes[module + ".weight"]
    bias = module + ".bias"
    return Target(root.full(module + ".weight"), root.full(bias) if bias in root.shapes else None,
                  None, component, tuple(shape))


def weighted_modules(root):
    """Relative module paths that own a ``.weight`` parameter, in key order."""
    return [k[: -len(".weight")] for k in root.shapes if k.endswith(".weight")]


WRAPPER = ".wrapped"  # A1111's hijack wraps token embeddings: "token_embedding.wrapped.weight"


def unwrapped(path: str) -> str:
    """The module's own path, without a host wrapper level at the end."""
    return path[: -len(WRAPPER)] if path.endswith(WRAPPER) else path


def underscored(path: str) -> str:
    """kohya's rule: the module path with every ``.`` replaced by ``_``."""
    return path.replace(".", "_")
