"""Every adapter type meets the one contract the engine relies on (``adapters.base.Adapter``):
shape fit, bias delta, rank and label come from the adapter itself, never from its class."""
from __future__ import annotations

import pytest
import torch

from lora_engine.adapters import build_adapter
from lora_engine.adapters.base import Adapter
from lora_engine.patch.delta import summed_bias, summed_delta
from lora_engine.patch.plan import Contribution
from tests.adapters.test_formulas import _catalog, _rn

# GLoRA's ΔW shape is decided by the target alone (its factors do not name the output width).
NO_SHAPE_OF_ITS_OWN = {"glora"}


def _with_bias(kind: str):
    roles, shape = _catalog()[kind]
    if kind in ("lora", "dora-in", "dora-out"):
        roles = {**roles, "up_bias": _rn(shape[0], seed=40)}
    return build_adapter(roles)[0], shape


@pytest.mark.parametrize("kind", sorted(_catalog()))
def test_every_type_implements_the_protocol(kind):
    adapter, shape = _with_bias(kind)
    assert isinstance(adapter, Adapter)
    w = _rn(*shape, seed=41)
    d = adapter.delta(w)
    assert adapter.has_bias_delta == (d.bias is not None)
    b = adapter.bias_delta()
    assert (b is None) == (d.bias is None) and (b is None or torch.equal(b, d.bias))
    assert adapter.misfit(shape) is None
    wrong = (shape[0] * 2 + 1, *shape[1:])
    if kind not in NO_SHAPE_OF_ITS_OWN:
        assert adapter.misfit(wrong) is not None
    assert adapter.label == (f"dora({adapter.inner.kind})" if kind.startswith("dora") else adapter.kind)
    assert adapter.rank is None or adapter.rank > 0


def test_summed_bias_is_the_bias_of_summed_delta_bit_for_bit():
    """The bias a host patches on its own (ComfyUI) equals the merged path's Δb, with DoRA and plain terms mixed."""
    terms = []
    for i, kind in enumerate(("lora", "full", "dora-out", "tucker")):
        adapter, shape = _with_bias(kind)
        if kind == "tucker":
            adapter = build_adapter({**_catalog()["tucker"][0], "up_bias": _rn(8, seed=42)})[0]
        terms.append(Contribution(f"f{i}", kind, 0.3 + 0.2 * i, adapter))
    w = _rn(8, 6, seed=43)
    conv = _rn(8, 6, 3, 3, seed=44)
    for subset in (terms[:1], terms[1:3], terms):
        base = conv if subset[-1].module_name == "tucker" else w
        want = summed_delta([t for t in subset if t.adapter.misfit(tuple(base.shape)) is None], base)[1]
        got = summed_bias([t for t in subset if t.adapter.misfit(tuple(base.shape)) is None], base.device)
        assert got is not None and torch.equal(got, want)
