"""``finite.nonfinite`` on every float dtype a weight or LoRA tensor can have, fp8 included (torch has no CPU
sum for fp8: the check must upcast exactly, never raise)."""
from __future__ import annotations

import pytest
import torch

from lora_engine.finite import nonfinite

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_finite_and_nonfinite_tensors_of_every_dtype(dtype):
    x = (torch.randn(257, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    assert not nonfinite(x)
    bad = x.clone()
    bad[100] = float("nan")
    assert nonfinite(bad)
    if dtype != torch.float8_e4m3fn:  # e4m3fn has no Inf: an Inf input becomes NaN, caught above
        inf = x.clone()
        inf[7] = float("inf")
        assert nonfinite(inf)


def test_a_large_but_finite_half_tensor_is_finite():
    """A half sum past 65504 overflows although every element is finite: retried in fp32, then exact."""
    x = torch.full((100,), 60000.0, dtype=torch.float16)
    assert not nonfinite(x)
    assert not nonfinite(None) and not nonfinite(torch.zeros(0)) and not nonfinite(torch.ones(3, device="meta"))


def test_probes_are_read_back_together():
    """Merged mode's deferred check: one sum per written weight, read back at the end of the apply."""
    from lora_engine.finite import finite_probes, probe

    tensors = [torch.ones(5), torch.tensor([1.0, float("inf")]).half(), torch.full((100,), 60000.0).half(),
               torch.tensor([float("nan")]).bfloat16()]
    probes = [probe(t) for t in tensors]
    assert finite_probes(probes) == [True, False, False, False]  # the third: a half sum that overflowed
    assert probe(torch.ones(2, device="meta")) is None and probe(torch.arange(3)) is None and finite_probes([]) == []
