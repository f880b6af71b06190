"""LoRAs on quantized bases (issue 20): fp8 e4m3fn/e5m2, ComfyUI scaled fp8, GGUF (Q8_0, Q4_0, Q6_K, Q5_K,
Q4_K) and bitsandbytes NF4, on ComfyUI's Flux tree at width 256 (the layers as the hosts hold them:
``tests/fixtures/models/quantized.py``).

Reference per touched layer: dequant(W₀) + Σ m·ΔW in float64 (ΔW by einsum from the file's tensors).
- On the fly (the default for quantized layers): the layer's output is within its own rounding of the
  reference output, and its stored bytes never change.
- Merged (opt-in): the effective weight is re-quantized in the same format; it is at least as close to
  the reference as the hosts' own merges reimplemented from their algorithms (ComfyUI: fp8 stochastic
  rounding; Forge: dequantize, merge, re-quantize), and a restore gives back every stored byte.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lora_engine.engine import LoraEngine, Mode
from lora_engine.formats import load_lora
from lora_engine.patch import StackEntry
from lora_engine.quant import quant_weight_at
from tests.quant.conftest import (MODULES_A, MODULES_B, comfy_stochastic_merge, reference, same_bytes,
                                  stored_bytes)

pytest.importorskip("diffusers")
gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _convert(name: str):
    from tests.fixtures.models import quantized as qz

    if name == "fp8_e4m3fn":
        return lambda r: qz.to_fp8(r, torch.float8_e4m3fn)
    if name == "fp8_e5m2":
        return lambda r: qz.to_fp8(r, torch.float8_e5m2)
    if name == "scaled_fp8":
        return lambda r: qz.to_fp8(r, torch.float8_e4m3fn, scaled=True)
    if name == "nf4":
        return qz.to_nf4
    return lambda r: qz.to_gguf(r, Q[name])


FORMATS = ["fp8_e4m3fn", "fp8_e5m2", "scaled_fp8", "Q8_0", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "nf4"]
MERGEABLE = ["fp8_e4m3fn", "fp8_e5m2", "scaled_fp8", "Q8_0", "Q4_0", "nf4"]


@pytest.fixture(scope="module")
def trees(base_tree):
    cache = {}

    def get(name):
        if name == "nf4":
            pytest.importorskip("bitsandbytes")
        if name not in cache:
            cache[name] = _convert(name)(copy.deepcopy(base_tree))
        return cache[name]
    return get


def _engine(root, mode):
    return LoraEngine.for_model(root, mode=mode)


def _stack(files, *names, m=1.0):
    return [StackEntry(load_lora(files[n][0]), unet=m) for n in names]


def _dequant(root, module) -> torch.Tensor:
    return quant_weight_at(root, module + ".weight").dequant()


@pytest.mark.parametrize("fmt", FORMATS)
def test_on_the_fly_is_the_reference_within_the_layers_own_rounding(trees, lora_files, fmt):
    root = trees(fmt)
    before = stored_bytes(root)
    w0 = {m: _dequant(root, m) for m in MODULES_A + MODULES_B}
    g = torch.Generator().manual_seed(3)
    xs = {m: torch.randn(4, root.get_submodule(m).in_features, generator=g) for m in w0}
    # the base layer's own rounding: its output against the exact product with its dequantized weight
    own = {}
    for m, x in xs.items():
        layer = root.get_submodule(m)
        bias = None if layer.bias is None else torch.Tensor(layer.bias).as_subclass(torch.Tensor).double()
        exact = F.linear(x.double(), w0[m].double(), bias)
        own[m] = ((layer(x).double() - exact).abs().max().item(), bias)
    engine = _engine(root, "automatic")
    assert engine.mode is Mode.ONTHEFLY  # automatic picks on the fly for a quantized model
    engine.set_stack(_stack(lora_files, "A", "B", m=0.8))
    assert engine.warnings() == []
    loras = [(lora_files["A"][1], 0.8), (lora_files["B"][1], 0.8)]
    for m, x in xs.items():
        ref = F.linear(x.double(), reference(w0[m], loras, m), own[m][1])
        err = (root.get_submodule(m)(x).double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= 2 * own[m][0] + 1e-6 * scale, f"{fmt} {m}: {err} vs the layer's own {own[m][0]}"
    assert same_bytes(before, stored_bytes(root)) == [], "on the fly wrote into a quantized weight"
    engine.restore()
    for m, x in xs.items():
        assert torch.equal(root.get_submodule(m)(x), root.get_submodule(m)(x))
    assert not any(mod._forward_hooks for mod in root.modules())


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "Q8_0"])
def test_on_the_fly_in_bf16_within_the_layers_own_rounding(trees, lora_files, fmt):
    root = trees(fmt)
    m = "double_blocks.0.img_attn.proj"
    w0 = _dequant(root, m)
    layer = root.get_submodule(m)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    bias = torch.Tensor(layer.bias).as_subclass(torch.Tensor).double()
    own = (layer(x).double() - F.linear(x.double(), w0.double(), bias)).abs().max().item()
    engine = _engine(root, "onthefly")
    engine.set_stack(_stack(lora_files, "A", "B"))
    ref = F.linear(x.double(), reference(w0, [(lora_files["A"][1], 1.0), (lora_files["B"][1], 1.0)], m), bias)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    err = (y.double() - ref).abs().max().item()
    engine.restore()
    assert err <= 2 * own, f"{fmt}: bf16 on the fly {err} vs the layer's own rounding {own}"


def _host_merge(fmt, root, module, ref: torch.Tensor) -> torch.Tensor:
    """The effective weight a host's merge gives (fp32): ComfyUI's stochastic rounding for fp8 (scaled:
    w/scale rounded, times the same scale), Forge's dequantize-merge-requantize for GGUF and NF4."""
    if fmt.startswith("fp8") or fmt == "scaled_fp8":
        layer = root.get_submodule(module)
        s = getattr(layer, "scale_weight", torch.tensor(1.0)).float()
        return comfy_stochastic_merge(ref.float() / s, layer.weight.dtype, seed=7) * s
    if fmt == "nf4":
        import bitsandbytes.functional as bnbf

        state = root.get_submodule(module).weight.quant_state
        codes, st = bnbf.quantize_4bit(ref.float(), blocksize=state.blocksize, quant_type=state.quant_type,
                                       compress_statistics=state.nested)
        return bnbf.dequantize_4bit(codes, st).float()
    blocks = gguf.quants.quantize(ref.float().numpy(), Q[fmt])
    return torch.from_numpy(gguf.quants.dequantize(blocks, Q[fmt])).reshape(ref.shape)


@pytest.mark.parametrize("fmt", MERGEABLE)
def test_merged_requantizes_at_least_as_close_as_the_hosts_and_restores(trees, lora_files, fmt):
    root = trees(fmt)
    before = stored_bytes(root)
    w0 = {m: _dequant(root, m) for m in MODULES_A + MODULES_B}
    engine = _engine(root, "merged")
    loras = [(lora_files["A"][1], 1.0), (lora_files["B"][1], -0.7)]
    engine.set_stack([StackEntry(load_lora(lora_files["A"][0]), unet=1.0),
                      StackEntry(load_lora(lora_files["B"][0]), unet=-0.7)])
    assert engine.warnings() == []
    for m in w0:
        ref = reference(w0[m], loras, m)
        got = _dequant(root, m).double()
        host = _host_merge(fmt, root, m, ref).double()
        ours_rms, host_rms = (got - ref).pow(2).mean().sqrt().item(), (host - ref).pow(2).mean().sqrt().item()
        assert ours_rms <= host_rms * (1 + 1e-6) + 1e-12, f"{fmt} {m}: ours {ours_rms} vs host's {host_rms}"
        if fmt.startswith("fp8") or fmt == "scaled_fp8":  # round to nearest: never farther than the host's pick
            assert bool(((got - ref).abs() <= (host - ref).abs() + 1e-9 * ref.abs().max()).all()), f"{fmt} {m}"
        # the LoRA's effect is there: the merged weight is nearer the reference than the untouched base
        assert ours_rms < (w0[m].double() - ref).pow(2).mean().sqrt().item(), f"{fmt} {m}: the LoRA is lost"
    engine.restore()
    assert same_bytes(before, stored_bytes(root)) == [], "restore is not bit-exact"


@pytest.mark.parametrize("fmt", ["scaled_fp8", "Q8_0"])
def test_a_thousand_switches_then_restore_bit_exact(trees, lora_files, fmt):
    root = trees(fmt)
    before = stored_bytes(root)
    engine = _engine(root, "merged")
    a, b = load_lora(lora_files["A"][0]), load_lora(lora_files["B"][0])
    # B alone touches two 256×256 layers; A and B share one of them: every switch rewrites or restores it
    stacks = [[StackEntry(b)], [StackEntry(b, unet=0.5)], [], [StackEntry(b), StackEntry(a, unet=0.3)]]
    engine.set_stack(stacks[3])
    for i in range(1000):
        engine.set_stack(stacks[i % 3])
    after_b = stored_bytes(root)
    engine.restore()
    assert same_bytes(before, stored_bytes(root)) == [], "restore after 1000 switches is not bit-exact"
    engine.set_stack(stacks[0])  # the same stack gives the same bits as after the switches (i = 999: stack 0)
    assert same_bytes(after_b, stored_bytes(root)) == []
    engine.restore()


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K"])
def test_merged_k_quants_left_as_they_were_with_one_line(trees, lora_files, fmt):
    root = trees(fmt)
    before = stored_bytes(root)
    engine = _engine(root, "merged")
    engine.set_stack(_stack(lora_files, "B"))
    (line,) = engine.warnings()
    assert "2 module(s) left as they were" in line and f"GGUF {fmt} cannot be re-quantized" in line, line
    assert "double_blocks.0.img_attn.proj.weight" in line, line
    assert same_bytes(before, stored_bytes(root)) == []
    engine.restore()


def test_unknown_quant_type_names_the_layer_and_the_rest_applies(base_tree, lora_files):
    root = _convert("Q8_0")(copy.deepcopy(base_tree))
    bad = root.get_submodule("double_blocks.0.img_attn.proj")
    bad.weight.tensor_type = 999  # a type this gguf does not know
    before = stored_bytes(root)
    for mode in ("merged", "onthefly"):
        engine = _engine(root, mode)
        if mode == "onthefly":  # a low-rank side path never reads the weight: a dense delta must
            from tests.quant.test_quantized_dense import loha_file

            entries = [StackEntry(load_lora(loha_file(root, "double_blocks.0.img_attn.proj")))]
        else:
            entries = _stack(lora_files, "A")
        engine.set_stack(entries)
        (line,) = engine.warnings()
        assert "double_blocks.0.img_attn.proj.weight: unknown GGUF quantization type 999" in line, line
        assert line.count("\n") == 0
        if mode == "merged":  # the other layers of A took the LoRA
            changed = same_bytes(before, stored_bytes(root))
            assert "double_blocks.0.img_attn.qkv.weight" in changed and "single_blocks.0.linear2.weight" in changed
            assert "double_blocks.0.img_attn.proj.weight" not in changed
        engine.restore()
        assert same_bytes(before, stored_bytes(root)) == []


def test_automatic_is_merged_for_a_plain_model(base_tree):
    assert _engine(copy.deepcopy(base_tree), "automatic").mode is Mode.MERGED


def test_backups_on_the_weights_device_are_real_copies(trees, lora_files):
    """ComfyUI-GGUF's GGMLTensor answers ``clone()`` with itself: a backup of its blocks kept beside the weight
    must still be a copy, or the restore would give back the merged values."""
    root = trees("Q8_0")
    before = stored_bytes(root)
    engine = LoraEngine.for_model(root, mode="merged", backup_device="same")
    engine.set_stack(_stack(lora_files, "A"))
    assert same_bytes(before, stored_bytes(root))
    engine.restore()
    assert same_bytes(before, stored_bytes(root)) == []
