"""Non-low-rank adapters (LoHa) on quantized layers: on the fly their dense ΔW is computed once from the
dequantized weight and applied in the compute dtype; merged re-quantizes W₀ + ΔW. Reference: ΔW by
einsum from the file's tensors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lora_engine.engine import LoraEngine
from lora_engine.formats import load_lora
from lora_engine.patch import StackEntry
from lora_engine.quant import logical_shape, quant_weight_at
from tests.quant.conftest import same_bytes, stored_bytes

pytest.importorskip("diffusers")
gguf = pytest.importorskip("gguf")


def _loha_tensors(o: int, i: int, seed: int, r: int = 4, alpha: float = 2.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.15 for k, shape in
            (("hada_w1_a", (o, r)), ("hada_w1_b", (r, i)), ("hada_w2_a", (o, r)), ("hada_w2_b", (r, i)))} | {
        "alpha": torch.tensor(alpha)}


def loha_file(root, module: str, seed: int = 21) -> str:
    """A kohya-named LoHa file on one module, next to the test's temporary files."""
    import tempfile

    o, i = logical_shape(root.get_submodule(module).weight)
    key = "lora_unet_" + module.replace(".", "_")
    path = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False).name
    save_file({f"{key}.{k}": v for k, v in _loha_tensors(o, i, seed).items()}, path)
    return path


def loha_delta(o: int, i: int, seed: int = 21, r: int = 4, alpha: float = 2.0) -> torch.Tensor:
    t = {k: v.double() for k, v in _loha_tensors(o, i, seed, r, alpha).items()}
    return (torch.einsum("or,ri->oi", t["hada_w1_a"], t["hada_w1_b"])
            * torch.einsum("or,ri->oi", t["hada_w2_a"], t["hada_w2_b"])) * (alpha / r)


@pytest.mark.parametrize("fmt", ["scaled_fp8", "Q4_K", "Q8_0"])
def test_loha_on_the_fly_and_merged(base_tree, fmt):
    from tests.fixtures.models import quantized as qz

    root = qz.to_fp8(copy.deepcopy(base_tree), scaled=True) if fmt == "scaled_fp8" else \
        qz.to_gguf(copy.deepcopy(base_tree), gguf.GGMLQuantizationType[fmt])
    m = "double_blocks.0.img_attn.proj"
    layer = root.get_submodule(m)
    w0 = quant_weight_at(root, m + ".weight").dequant().double()
    ref_w = w0 + loha_delta(*w0.shape)
    bias = torch.Tensor(layer.bias).as_subclass(torch.Tensor).double()
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    own = (layer(x).double() - F.linear(x.double(), w0, bias)).abs().max().item()
    before = stored_bytes(root)
    path = loha_file(root, m)
    engine = LoraEngine.for_model(root, mode="onthefly")
    engine.set_stack([StackEntry(load_lora(path))])
    assert engine.warnings() == []
    err = (layer(x).double() - F.linear(x.double(), ref_w, bias)).abs().max().item()
    assert err <= 2 * own + 1e-6, (err, own)
    assert same_bytes(before, stored_bytes(root)) == []
    engine.restore()
    if fmt == "Q4_K":
        return  # no quantizer for K-quants: merging is refused (test_quantized_bases)
    engine = LoraEngine.for_model(root, mode="merged")
    engine.set_stack([StackEntry(load_lora(path))])
    got = quant_weight_at(root, m + ".weight").dequant().double()
    assert (got - ref_w).pow(2).mean() < (w0 - ref_w).pow(2).mean()  # the delta is in, to the format's rounding
    engine.restore()
    assert same_bytes(before, stored_bytes(root)) == []
