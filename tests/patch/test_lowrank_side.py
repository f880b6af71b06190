"""The fused on-the-fly side path against an independent dense computation, for every branch it takes:
Linear (addmm into the output), 1×1 convolution (batched products over the pixels), k×k strided
convolution (two convolutions); factors all equal (α of the GEMM), different, per sample, and zero;
in place under no_grad and out of place when autograd records."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_engine.adapters.lora import LoRA
from lora_engine.patch.lowrank_side import FusedLowRank
from lora_engine.patch.plan import Contribution

RANKS = (4, 2)


def _contribs(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    o = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels
    cs = []
    for j, r in enumerate(RANKS):
        if isinstance(module, torch.nn.Linear):
            down = torch.randn(r, module.in_features, generator=g)
            up = torch.randn(o, r, generator=g)
        else:
            kh, kw = module.kernel_size
            down = torch.randn(r, module.in_channels, kh, kw, generator=g)
            up = torch.randn(o, r, 1, 1, generator=g)
        cs.append(Contribution(f"l{j}", f"m{j}", 0.7 - 0.9 * j, LoRA(down=down, up=up, scale=0.5 + j)))
    return cs


def _expected(module, x, contribs, factors):
    """base(x) + Σ_j f_j · m_j · s_j · (up_j · down_j) applied as a dense weight, in float64."""
    m64 = type(module)(**_ctor(module)).double()
    m64.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    y = m64(x.double())
    for c, f in zip(contribs, factors):
        a = c.adapter
        dw = (a.up.double().reshape(a.up.shape[0], -1) @ a.down.double().reshape(a.rank, -1)).reshape(
            m64.weight.shape) * (a.scale * c.strength)
        side = F.linear(x.double(), dw) if isinstance(module, torch.nn.Linear) else \
            F.conv2d(x.double(), dw, None, module.stride, module.padding, module.dilation)
        f = f.double().reshape(-1, *([1] * (side.ndim - 1))) if isinstance(f, torch.Tensor) else f
        y = y + side * f
    return y


def _ctor(module):
    if isinstance(module, torch.nn.Linear):
        return dict(in_features=module.in_features, out_features=module.out_features)
    return dict(in_channels=module.in_channels, out_channels=module.out_channels, kernel_size=module.kernel_size,
                stride=module.stride, padding=module.padding, dilation=module.dilation)


MODULES = {
    "linear": (lambda: torch.nn.Linear(12, 10), (3, 7, 12)),
    "conv1x1": (lambda: torch.nn.Conv2d(12, 10, 1), (3, 12, 5, 6)),
    "conv3x3_s2_p1": (lambda: torch.nn.Conv2d(12, 10, 3, stride=2, padding=1), (3, 12, 9, 8)),
}
FACTORS = {
    "ones": [1.0, 1.0],
    "equal": [-0.6, -0.6],
    "different": [1.0, 0.3],
    "per_sample": [torch.tensor([1.0, 0.0, -0.5]), torch.tensor([0.2, 1.0, 1.0])],
    "zero": [0.0, 0.0],
}


@pytest.mark.parametrize("kind", sorted(MODULES))
@pytest.mark.parametrize("factors", sorted(FACTORS))
@pytest.mark.parametrize("grad", [False, True])
def test_side_path_equals_dense_delta(kind, factors, grad):
    torch.manual_seed(1)
    make, shape = MODULES[kind]
    module = make()
    contribs = _contribs(module)
    x = torch.randn(*shape, requires_grad=grad)
    fused = FusedLowRank(contribs, module, x.dtype, x.device)
    assert fused.pointwise == (kind == "conv1x1")
    fs = FACTORS[factors]
    with torch.set_grad_enabled(grad):
        y = fused(x, module(x), fs, module)
    want = _expected(module, x.detach(), contribs, fs)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    if grad:  # out of place: autograd reaches the input through the side path
        y.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_per_sample_factors_must_match_the_batch():
    from lora_engine.errors import LoraEngineError

    module = torch.nn.Conv2d(12, 10, 1)
    fused = FusedLowRank(_contribs(module), module, torch.float32, torch.device("cpu"))
    x = torch.randn(3, 12, 4, 4)
    with pytest.raises(LoraEngineError, match="2 samples, but the batch has 3"):
        fused(x, module(x), [torch.tensor([1.0, 0.5]), 1.0], module)
