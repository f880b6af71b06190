"""Hand-derived numeric checks of the adapter formulas, each against an independent computation:
explicit loops / numpy / sequential convolutions, never the code under test.

Tolerances: fp32 results against fp64 (numpy) references at rtol 1e-5 / atol 1e-6 (fp32 rounding of
sums of ≤ 100 terms of size ~1); the dtype test demands bit-identical results, because upcasting
fp16/bf16 to fp32 first is exact, so any difference means some step ran in half precision.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lora_engine.adapters import AlphaSpec, build_adapter
from lora_engine.adapters.dora import DoRA, dora_axis
from lora_engine.adapters.lokr import LoKr
from lora_engine.adapters.lora import LoRA
from lora_engine.adapters.oft import OFT
from lora_engine.patch.delta import summed_delta
from lora_engine.patch.plan import Contribution

TOL = dict(rtol=1e-5, atol=1e-6)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _rn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=_g(seed), dtype=torch.float32) * scale


# ---------------------------------------------------------------- LoKr: explicit Kronecker product


def _kron_loops(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """out[i·q + k, j·n + l, ...] = a[i, j] · b[k, l, ...], written out."""
    p, m = a.shape
    q, n = b.shape[:2]
    out = np.zeros((p * q, m * n, *b.shape[2:]))
    for i in range(p):
        for j in range(m):
            for k in range(q):
                for l in range(n):
                    out[i * q + k, j * n + l] = a[i, j] * b[k, l]
    return out


def test_lokr_linear_decomposed_w2_matches_loops():
    w1, w2a, w2b = _rn(2, 3, seed=1), _rn(4, 2, seed=2), _rn(2, 5, seed=3)
    adapter, left = build_adapter({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(3.0)})
    assert not left and isinstance(adapter, LoKr)
    w2 = w2a.double().numpy() @ w2b.double().numpy()
    want = (3.0 / 2) * _kron_loops(w1.double().numpy(), w2)  # α/r, r = rank of the decomposed factor
    got = adapter.delta(torch.zeros(8, 15)).weight
    torch.testing.assert_close(got, torch.from_numpy(want).float(), **TOL)


def test_lokr_conv_kernel_lives_in_w2():
    w1, w2 = _rn(2, 2, seed=4), _rn(3, 4, 3, 3, seed=5)
    adapter, _ = build_adapter({"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)})
    want = _kron_loops(w1.double().numpy(), w2.double().numpy())  # both factors full: α ignored, s = 1
    got = adapter.delta(torch.zeros(6, 8, 3, 3)).weight
    torch.testing.assert_close(got, torch.from_numpy(want).float(), **TOL)


# ---------------------------------------------------------------- OFT: Cayley transform in numpy


def _cayley_np(blocks: np.ndarray, constraint: float) -> np.ndarray:
    q = blocks - np.swapaxes(blocks, -1, -2)
    if constraint > 0:
        norm = np.sqrt((q ** 2).sum())
        if norm > constraint:
            q = q * constraint / norm
    eye = np.eye(blocks.shape[-1])
    return np.stack([(eye + qk) @ np.linalg.inv(eye - qk) for qk in q])


@pytest.mark.parametrize("alpha", [0.0, 1e-3])
def test_diag_oft_matches_numpy_cayley(alpha):
    o, i, b = 8, 5, 4
    blocks, w = _rn(o // b, b, b, seed=6, scale=0.3), _rn(o, i, seed=7)
    adapter, _ = build_adapter({"oft_blocks": blocks, "alpha": torch.tensor(alpha)})
    r = _cayley_np(blocks.double().numpy(), alpha * o)
    for rk in r:
        np.testing.assert_allclose(rk.T @ rk, np.eye(b), atol=1e-12)  # really a rotation
    wn = w.double().numpy()
    want = np.concatenate([r[k].T @ wn[k * b:(k + 1) * b] for k in range(o // b)]) - wn
    got = adapter.delta(w).weight
    torch.testing.assert_close(got, torch.from_numpy(want).float(), **TOL)
    if alpha:  # the clamp was active: an unclamped transform gives a different answer
        free = np.concatenate([_cayley_np(blocks.double().numpy(), 0)[k].T @ wn[k * b:(k + 1) * b]
                               for k in range(o // b)]) - wn
        assert np.abs(free - want).max() > 1e-2


# ---------------------------------------------------------------- Tucker LoRA: sequential convolutions


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_tucker_lora_equals_sequential_convs(stride, padding):
    o, i, r, k = 6, 5, 3, 3
    down, mid, up = _rn(r, i, 1, 1, seed=8), _rn(r, r, k, k, seed=9), _rn(o, r, 1, 1, seed=10)
    adapter, _ = build_adapter({"down": down, "mid": mid, "up": up, "alpha": torch.tensor(1.5)})
    x = _rn(2, i, 9, 9, seed=11).double()
    seq = F.conv2d(F.conv2d(F.conv2d(x, down.double()), mid.double(), stride=stride, padding=padding), up.double())
    dense = adapter.delta(torch.zeros(o, i, k, k)).weight.double()
    torch.testing.assert_close(F.conv2d(x, dense, stride=stride, padding=padding), (1.5 / r) * seq, **TOL)


def test_locon_conv_equals_sequential_convs():
    down, up = _rn(3, 4, 3, 3, seed=12), _rn(7, 3, 1, 1, seed=13)
    adapter, _ = build_adapter({"down": down, "up": up})  # no α: α = r, s = 1
    x = _rn(1, 4, 8, 8, seed=14).double()
    seq = F.conv2d(F.conv2d(x, down.double(), padding=1), up.double())
    dense = adapter.delta(torch.zeros(7, 4, 3, 3)).weight.double()
    torch.testing.assert_close(F.conv2d(x, dense, padding=1), seq, **TOL)


# ---------------------------------------------------------------- DoRA: axis from the magnitude's shape


def _dora_loops(w: np.ndarray, v: np.ndarray, mag: np.ndarray, axis: int) -> np.ndarray:
    out = np.zeros_like(v)
    if axis == 0:
        for a in range(v.shape[0]):
            out[a] = mag[a] * v[a] / np.sqrt((v[a] ** 2).sum())
    else:
        for c in range(v.shape[1]):
            out[:, c] = mag[c] * v[:, c] / np.sqrt((v[:, c] ** 2).sum())
    return out - w


LAYOUTS = [  # (weight shape, magnitude shape, forced axis, expected axis)
    ((6, 6), (6,), None, 0),
    ((6, 6), (6, 1), None, 0),
    ((6, 6), (1, 6), None, 1),
    ((5, 7), (1, 7), None, 1),
    ((5, 7, 3, 3), (1, 7, 1, 1), None, 1),
    ((5, 7, 3, 3), (5, 1, 1, 1), None, 0),
    ((5, 7, 3, 3), (1, 5, 1, 1), 0, 0),  # PEFT's conv lora_magnitude_vector, axis forced
]


@pytest.mark.parametrize("wshape,mshape,forced,axis", LAYOUTS)
def test_dora_axis_and_formula(wshape, mshape, forced, axis):
    if forced is None:
        assert dora_axis(mshape, wshape) == axis
    o, i = wshape[:2]
    down, up = _rn(2, i, *wshape[2:], seed=15), _rn(o, 2, seed=16)
    inner = LoRA(down, up, 0.7)
    mag = _rn(*mshape, seed=17).abs() + 0.5
    w = _rn(*wshape, seed=18)
    got = DoRA(inner, mag, forced).delta(w).weight
    wn = w.double().numpy().reshape(o, i, -1)
    v = wn + 0.7 * (up.double().numpy() @ down.double().numpy().reshape(2, -1)).reshape(wn.shape)
    want = _dora_loops(wn, v, mag.double().numpy().reshape(-1), axis).reshape(wshape)
    torch.testing.assert_close(got, torch.from_numpy(want).float(), **TOL)


def test_dora_magnitude_fitting_no_axis_is_refused():
    with pytest.raises(ValueError, match="fits neither"):
        dora_axis((3,), (5, 7))


def test_dora_with_its_own_norm_is_the_inner_adapter_direction_only():
    """mag = ‖W‖ (rows) and a zero inner delta give W back exactly: DoRA at rest is the identity."""
    w = _rn(5, 7, seed=19)
    inner = LoRA(_rn(2, 7, seed=20), torch.zeros(5, 2), 1.0)
    d = DoRA(inner, torch.linalg.vector_norm(w, dim=1), None).delta(w).weight
    torch.testing.assert_close(d, torch.zeros_like(w), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- dyn truncation


@pytest.mark.parametrize("dyn", [1, 3])
def test_dyn_truncation_keeps_full_rank_scale(dyn):
    down, up = _rn(5, 6, seed=21), _rn(4, 5, seed=22)
    a, _ = build_adapter({"down": down, "up": up, "alpha": torch.tensor(2.0)})
    t = a.truncated(dyn)
    want = torch.zeros(4, 6, dtype=torch.float64)
    for k in range(dyn):
        want += (2.0 / 5) * torch.outer(up[:, k].double(), down[k].double())
    torch.testing.assert_close(t.delta(torch.zeros(4, 6)).weight, want.float(), **TOL)
    assert a.truncated(0) is a and a.truncated(5) is a and a.truncated(9) is a


# ---------------------------------------------------------------- every type: strength 0, half-precision inputs


def _catalog(dtype=torch.float32) -> dict[str, tuple[dict, tuple[int, ...]]]:
    """Roles of one module of every type (as a file would hold them) and the target weight shape."""
    def t(*s, seed, scale=0.5):
        return _rn(*s, seed=seed, scale=scale).to(dtype)
    alpha = torch.tensor(2.0)
    lora = {"down": t(3, 6, seed=1), "up": t(8, 3, seed=2), "alpha": alpha}
    return {
        "lora": (lora, (8, 6)),
        "locon": ({"down": t(3, 6, 3, 3, seed=3), "up": t(8, 3, 1, 1, seed=4)}, (8, 6, 3, 3)),
        "tucker": ({"down": t(3, 6, 1, 1, seed=5), "mid": t(3, 3, 3, 3, seed=6), "up": t(8, 3, 1, 1, seed=7)},
                   (8, 6, 3, 3)),
        "loha": ({"hada_w1_a": t(8, 2, seed=8), "hada_w1_b": t(2, 6, seed=9), "hada_w2_a": t(8, 2, seed=10),
                  "hada_w2_b": t(2, 6, seed=11), "alpha": alpha}, (8, 6)),
        "lokr": ({"lokr_w1": t(2, 2, seed=12), "lokr_w2_a": t(4, 2, seed=13), "lokr_w2_b": t(2, 3, seed=14),
                  "alpha": alpha}, (8, 6)),
        "ia3": ({"weight": t(8, seed=15), "on_input": torch.tensor(0)}, (8, 6)),
        "glora": ({"a1": t(6, 2, seed=16), "a2": t(2, 6, seed=17), "b1": t(8, 2, seed=18), "b2": t(2, 6, seed=19),
                   "alpha": alpha}, (8, 6)),
        "full": ({"diff": t(8, 6, seed=20), "diff_b": t(8, seed=21)}, (8, 6)),
        "norm": ({"w_norm": t(8, seed=22), "b_norm": t(8, seed=23)}, (8,)),
        "oft": ({"oft_blocks": t(2, 4, 4, seed=24), "alpha": torch.tensor(0.0)}, (8, 6)),
        "boft": ({"oft_blocks": t(2, 4, 2, 2, seed=25), "alpha": torch.tensor(0.0)}, (8, 6)),
        "dora-in": ({**lora, "dora_scale": (t(1, 6, seed=26).abs() + 0.5)}, (8, 6)),
        "dora-out": ({**lora, "dora_scale": (t(8, 1, seed=27).abs() + 0.5)}, (8, 6)),
    }


@pytest.mark.parametrize("kind", sorted(_catalog()))
def test_strength_zero_gives_the_base_back(kind):
    roles, shape = _catalog()[kind]
    adapter, left = build_adapter(roles, AlphaSpec())
    assert not left
    w = _rn(*shape, seed=30)
    d1 = adapter.delta(w)
    assert d1.weight.abs().max() > 1e-3  # the adapter does something at strength 1
    dw, db = summed_delta([Contribution("x", kind, 0.0, adapter)], w)
    assert torch.equal(w + dw, w) and (db is None or torch.equal(db, torch.zeros_like(db)))
    half, _ = summed_delta([Contribution("x", kind, 0.5, adapter)], w)  # strength is linear on ΔW
    torch.testing.assert_close(half, 0.5 * d1.weight, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(_catalog()))
def test_delta_is_computed_in_fp32_from_half_tensors(kind, dtype):
    roles, shape = _catalog(dtype)[kind]
    adapter, _ = build_adapter(roles)
    ref, _ = build_adapter({k: (v.float() if v.is_floating_point() else v) for k, v in roles.items()})
    w = _rn(*shape, seed=31).to(dtype)
    got, want = adapter.delta(w), ref.delta(w.float())
    assert got.weight.dtype == torch.float32
    assert torch.equal(got.weight, want.weight), (got.weight - want.weight).abs().max()
    if got.bias is not None:
        assert got.bias.dtype == torch.float32 and torch.equal(got.bias, want.bias)


def test_half_precision_product_would_be_caught():
    """The fp32 test above can fail: a LoRA product taken in fp16 differs from the fp32 one."""
    roles, _ = _catalog(torch.float16)["lora"]
    fp16 = (roles["up"] @ roles["down"]).float()
    fp32 = roles["up"].float() @ roles["down"].float()
    assert not torch.equal(fp16, fp32)
    assert math.isclose(build_adapter(roles)[0].scale, 2.0 / 3)
