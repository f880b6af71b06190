"""``add_base`` (acc += W₀ with W₀ upcast in blocks) gives exactly the bits of a plain mixed-dtype add,
across block boundaries, for half, bfloat16 and fp32 bases and for non-contiguous bases."""
from __future__ import annotations

import pytest
import torch

from lora_engine.patch.delta import _UPCAST_BLOCK, add_base


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 1000, _UPCAST_BLOCK, 2 * _UPCAST_BLOCK + 7])
def test_add_base_equals_plain_add(dtype, n):
    g = torch.Generator().manual_seed(n)
    w0 = (torch.randn(n, generator=g) * 3).to(dtype)
    acc = torch.randn(n, generator=g) * 1e-3
    want = acc.clone().add_(w0)
    got = add_base(acc, w0)
    assert got is acc and torch.equal(got, want)


def test_add_base_reads_a_strided_base():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(64, 2 * 4099, generator=g).half()
    w0 = big[:, ::2]  # not contiguous
    acc = torch.randn(64, 4099, generator=g)
    want = acc.clone().add_(w0)
    assert torch.equal(add_base(acc, w0), want)
