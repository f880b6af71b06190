"""The quantized-weight abstraction alone, on single layers: format names, logical shapes, the scaled-fp8
marker, exact stored-byte round trips, and re-quantizing a weight's own dequantization."""
from __future__ import annotations

import pytest
import torch

from lora_engine.quant import QuantError, logical_shape, quant_weight, scaled_fp8_dtype


def test_scaled_fp8_marker_names_the_fp8_type():
    assert scaled_fp8_dtype({"scaled_fp8": torch.empty(0, dtype=torch.float32)}) is torch.float8_e4m3fn
    assert scaled_fp8_dtype({"model.diffusion_model.scaled_fp8": torch.empty(2, dtype=torch.float8_e5m2)},
                            "model.diffusion_model.") is torch.float8_e5m2
    assert scaled_fp8_dtype({"x.weight": torch.zeros(1)}) is None


def _scaled_linear(dtype=torch.float8_e4m3fn):
    from tests.fixtures.models.quantized import to_fp8

    torch.manual_seed(0)
    return to_fp8(torch.nn.Sequential(torch.nn.Linear(64, 48)), dtype, scaled=True)[0]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_scaled_fp8_reads_with_its_scale_and_requantizes_to_the_same_bytes(dtype):
    layer = _scaled_linear(dtype)
    q = quant_weight(layer, "weight")
    assert q.format == ("scaled fp8 e4m3fn" if dtype == torch.float8_e4m3fn else "scaled fp8 e5m2")
    w = q.dequant()
    assert torch.equal(w, layer.weight.float() * layer.scale_weight)  # not the bare fp8 codes
    before = q.stored()
    q.requant(w)  # a weight's own value goes back to the same codes
    assert torch.equal(q.stored()[0].view(torch.uint8), before[0].view(torch.uint8))
    q.requant(w + 0.3)  # then any change is undone byte for byte
    assert not torch.equal(q.stored()[0].view(torch.uint8), before[0].view(torch.uint8))
    q.put(before)
    assert torch.equal(q.stored()[0].view(torch.uint8), before[0].view(torch.uint8))
    assert quant_weight(layer, "bias") is None  # an fp32 bias is plain


def test_gguf_rows_round_trip_and_unknown_type():
    gguf = pytest.importorskip("gguf")
    from tests.fixtures.models.quantized import to_gguf

    torch.manual_seed(1)
    layer = to_gguf(torch.nn.Sequential(torch.nn.Linear(64, 8)), gguf.GGMLQuantizationType.Q8_0)[0]
    q = quant_weight(layer, "weight")
    assert q.format == "GGUF Q8_0" and q.shape == (8, 64) == logical_shape(layer.weight)
    rows = (2, 5)
    before = q.stored()
    part = q.dequant(rows)
    assert torch.equal(part, q.dequant()[2:5])
    q.requant(part * 2, rows)
    after = q.stored()
    assert torch.equal(after[:2], before[:2]) and torch.equal(after[5:], before[5:])  # other rows untouched
    assert not torch.equal(after[2:5], before[2:5])
    q.put(before[2:5].clone(), rows)
    assert torch.equal(q.stored(), before)
    layer.weight.tensor_type = 77
    with pytest.raises(QuantError, match="unknown GGUF quantization type 77"):
        quant_weight(layer, "weight")


def test_nf4_logical_shape_and_exact_restore():
    pytest.importorskip("bitsandbytes")
    from tests.fixtures.models.quantized import to_nf4

    torch.manual_seed(2)
    layer = to_nf4(torch.nn.Sequential(torch.nn.Linear(128, 32)))[0]
    q = quant_weight(layer, "weight")
    assert q.format == "bitsandbytes NF4" and logical_shape(layer.weight) == (32, 128) == q.shape
    before, absmax = q.stored(), layer.weight.quant_state.absmax.clone()
    q.requant(q.dequant() + 0.5)
    assert not torch.equal(layer.weight.quant_state.absmax, absmax)
    q.put(before)
    assert torch.equal(q.stored()[0], before[0]) and torch.equal(layer.weight.quant_state.absmax, absmax)
    assert q.merge_problem((0, 8)) is not None and q.merge_problem() is None
