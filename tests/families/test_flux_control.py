"""BFL control LoRAs (FLUX.1 Canny/Depth LoRA): BFL names with ``lora_A``/``lora_B`` + ``lora_B.bias`` (bias
deltas), whole ``…query_norm.scale``/``key_norm.scale`` tensors (set, not added) and an ``img_in`` LoRA whose
input is wider than the model's (latents + control image).

Oracle: diffusers' own ``FluxLoraLoaderMixin.load_lora_weights`` (norms loaded into the model, ``lora_B.bias``
through PEFT's ``lora_bias``, ``x_embedder`` expanded) on the tiny model, fed the file converted to diffusers
names here as diffusers' ``_convert_bfl_flux_control_lora_to_diffusers`` does (that converter hard-codes
Flux.1-dev's 19/38 blocks and width 3072, so at this size the conversion is written out below: A shared,
B and its bias chunked by the config's q/k/v/mlp sizes, the final adaLN's B rows swapped)."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from tests.fixtures.models.flux import NativeTree, flux_model, native_state

pytest.importorskip("diffusers")
pytest.importorskip("peft")

R = 2
WIDER = 4  # control channels the img_in LoRA reads beyond the model's input


@pytest.fixture(scope="module")
def models():
    d = flux_model(seed=11)
    return d, NativeTree(native_state(d))


def _table(d) -> dict[str, list]:
    """native module -> [(diffusers module, rows of the native delta or None)], from the diffusers config."""
    cfg = d.config
    h = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = d.single_transformer_blocks[0].proj_mlp.out_features
    t = {"txt_in": [("context_embedder", None)], "img_in": [("x_embedder", None)],
         "time_in.in_layer": [("time_text_embed.timestep_embedder.linear_1", None)],
         "time_in.out_layer": [("time_text_embed.timestep_embedder.linear_2", None)],
         "vector_in.in_layer": [("time_text_embed.text_embedder.linear_1", None)],
         "vector_in.out_layer": [("time_text_embed.text_embedder.linear_2", None)],
         "final_layer.linear": [("proj_out", None)],
         "final_layer.adaLN_modulation.1": [("norm_out.linear", "swap")]}
    for i in range(cfg.num_layers):
        b, p = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        t[b + "img_mod.lin"] = [(p + "norm1.linear", None)]
        t[b + "txt_mod.lin"] = [(p + "norm1_context.linear", None)]
        t[b + "img_attn.qkv"] = [(p + f"attn.to_{x}", (j * h, (j + 1) * h)) for j, x in enumerate("qkv")]
        t[b + "txt_attn.qkv"] = [(p + f"attn.add_{x}_proj", (j * h, (j + 1) * h)) for j, x in enumerate("qkv")]
        t[b + "img_attn.proj"] = [(p + "attn.to_out.0", None)]
        t[b + "txt_attn.proj"] = [(p + "attn.to_add_out", None)]
        t[b + "img_mlp.0"], t[b + "img_mlp.2"] = [(p + "ff.net.0.proj", None)], [(p + "ff.net.2", None)]
        t[b + "txt_mlp.0"], t[b + "txt_mlp.2"] = [(p + "ff_context.net.0.proj", None)], [(p + "ff_context.net.2", None)]
    for i in range(cfg.num_single_layers):
        b, p = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        t[b + "modulation.lin"] = [(p + "norm.linear", None)]
        t[b + "linear1"] = [(p + "attn.to_q", (0, h)), (p + "attn.to_k", (h, 2 * h)), (p + "attn.to_v", (2 * h, 3 * h)),
                            (p + "proj_mlp", (3 * h, 3 * h + mlp))]
        t[b + "linear2"] = [(p + "proj_out", None)]
    return t


def _norms(d) -> dict[str, str]:
    out = {}
    for i in range(d.config.num_layers):
        b, p = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        out.update({b + "img_attn.norm.query_norm.scale": p + "norm_q.weight", b + "img_attn.norm.key_norm.scale": p + "norm_k.weight",
                    b + "txt_attn.norm.query_norm.scale": p + "norm_added_q.weight",
                    b + "txt_attn.norm.key_norm.scale": p + "norm_added_k.weight"})
    for i in range(d.config.num_single_layers):
        b, p = f"single_blocks.{i}.norm.", f"single_transformer_blocks.{i}.attn."
        out.update({b + "query_norm.scale": p + "norm_q.weight", b + "key_norm.scale": p + "norm_k.weight"})
    return out


def control_file(d, nshapes, path, seed: int, wider: bool = True):
    """A BFL control LoRA for the model (every layer, bias deltas, norm tensors, img_in ``WIDER`` wider)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for native in _table(d):
        o, i = nshapes[native + ".weight"]
        if native == "img_in" and wider:
            i += WIDER
        out[f"{native}.lora_A.weight"] = torch.randn(R, i, generator=g) * 0.1
        out[f"{native}.lora_B.weight"] = torch.randn(o, R, generator=g) * 0.1
        out[f"{native}.lora_B.bias"] = torch.randn(o, generator=g) * 0.1
    for native in _norms(d):
        out[native] = 1.0 + torch.randn(nshapes[native], generator=g) * 0.1
    save_file(out, str(path))
    return str(path), out


def _to_diffusers(d, t: dict) -> dict[str, torch.Tensor]:
    out = {}
    for native, parts in _table(d).items():
        a, b, bias = (t[f"{native}.lora_{x}"] for x in ("A.weight", "B.weight", "B.bias"))
        for module, rows in parts:
            if rows == "swap":
                half = b.shape[0] // 2
                bb, bi = torch.cat([b[half:], b[:half]]), torch.cat([bias[half:], bias[:half]])
            elif rows is None:
                bb, bi = b, bias
            else:
                bb, bi = b[rows[0]:rows[1]], bias[rows[0]:rows[1]]
            out[f"transformer.{module}.lora_A.weight"] = a.clone()
            out[f"transformer.{module}.lora_B.weight"] = bb.clone()
            out[f"transformer.{module}.lora_B.bias"] = bi.clone()
    for native, key in _norms(d).items():
        out[f"transformer.{key}"] = t[native].clone()
    return out


def diffusers_control_oracle(d, tensors):
    from diffusers.loaders import FluxLoraLoaderMixin
    from peft.tuners.tuners_utils import BaseTunerLayer

    class Pipe(FluxLoraLoaderMixin):
        def __init__(self, transformer):
            self.transformer, self.text_encoder, self.hf_device_map = transformer, None, None
            self.components = {"transformer": transformer}

    m = copy.deepcopy(d)
    Pipe(m).load_lora_weights(_to_diffusers(d, tensors), adapter_name="control")
    for mod in m.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.merge()
    return {k.replace(".base_layer", ""): v for k, v in m.state_dict().items() if "lora_" not in k}


def _apply(root, path, strength=1.0):
    before = {k: v.clone() for k, v in root.state_dict().items()}
    e = LoraEngine(root, build_keymap(shapes_of(root)), mode="merged")
    plan = e.set_stack([StackEntry(load_lora(path), unet=strength)])
    after = {k: v.clone() for k, v in root.state_dict().items()}
    warnings = e.warnings()
    e.restore()
    assert all(torch.equal(before[k], v) for k, v in root.state_dict().items()), "restore is not bit-exact"
    return before, after, warnings, plan


def test_control_lora_matches_diffusers(models, tmp_path):
    d, n = models
    path, t = control_file(d, shapes_of(n), tmp_path / "canny.safetensors", 1)
    lf = load_lora(path)
    assert not lf.unknown_keys and not lf.problems
    assert sum(1 for m in lf.modules.values() if m.kind == "set") == len(_norms(d))
    want = diffusers_control_oracle(d, t)
    assert want["x_embedder.weight"].shape[1] == d.x_embedder.in_features + WIDER  # diffusers expanded it
    before, got, warnings, plan = _apply(d, path)
    assert len(warnings) == 1 and "x_embedder" in warnings[0] and f"{WIDER} control-image channels" in warnings[0], warnings
    assert torch.equal(got["x_embedder.weight"], before["x_embedder.weight"])  # refused, not corrupted
    assert torch.equal(got["x_embedder.bias"], before["x_embedder.bias"])
    checked = 0
    for k, w in want.items():
        if k.startswith("x_embedder."):
            continue
        assert torch.allclose(got[k], w, atol=1e-6, rtol=0), f"{k}: {(got[k] - w).abs().max()}"
        checked += not torch.equal(w, before[k])
    assert checked > 40  # weights, biases and norms all changed
    for key in _norms(d).values():  # set, not added: exactly the file's tensor
        assert torch.equal(got[key], want[key])
    # the native tree: the same values through the declaration's row layout
    _, got_n, warnings_n, _ = _apply(n, path)
    assert len(warnings_n) == 1 and "img_in" in warnings_n[0]
    oracle = copy.deepcopy(d)
    oracle.load_state_dict({k: (before[k] if k.startswith("x_embedder.") else v) for k, v in want.items()})
    for k, w in native_state(oracle).items():
        assert torch.allclose(got_n[k], w, atol=1e-6, rtol=0), k


def test_set_weights_ignore_strength_and_bias_scales(models, tmp_path):
    """At strength 0.5 the LoRA and bias deltas halve, the norms are still set (as ComfyUI's ``set`` patch and
    diffusers' norm loading do); on the fly gives the same layer outputs; restore is exact."""
    d, n = models
    nshapes = shapes_of(n)
    path, t = control_file(d, nshapes, tmp_path / "depth.safetensors", 2, wider=False)
    before, got, warnings, _ = _apply(n, path, 0.5)
    assert warnings == []
    for native in _norms(d):
        assert torch.equal(got[native], t[native]), native
    k = "double_blocks.0.img_attn.qkv"
    a, b, bias = (t[f"{k}.lora_{x}"].double() for x in ("A.weight", "B.weight", "B.bias"))
    assert torch.allclose(got[k + ".weight"].double(), before[k + ".weight"].double() + 0.5 * b @ a, atol=1e-7)
    assert torch.allclose(got[k + ".bias"].double(), before[k + ".bias"].double() + 0.5 * bias, atol=1e-7)
    # on the fly: the Linear layers' outputs equal merged's
    torch.manual_seed(0)
    linears = [p for p, m in n.named_modules() if isinstance(m, torch.nn.Linear)]
    xs = {p: torch.randn(3, n.get_submodule(p).in_features) for p in linears}
    km = build_keymap(nshapes)
    with torch.no_grad():
        m = LoraEngine(n, km, mode="merged")
        m.set_stack([StackEntry(load_lora(path), unet=0.5)])
        merged = {p: n.get_submodule(p)(xs[p]) for p in linears}
        m.restore()
        f = LoraEngine(n, km, mode="onthefly")
        f.set_stack([StackEntry(load_lora(path), unet=0.5)])
        fly = {p: n.get_submodule(p)(xs[p]) for p in linears}
        f.restore()
    for p in linears:
        assert torch.allclose(fly[p], merged[p], atol=1e-5), p
    assert all(torch.equal(before[k], v) for k, v in n.state_dict().items())


def test_full_size_conversion_matches_diffusers(tmp_path):
    """At Flux.1-dev's size (19 + 38 blocks, width 3072; the converter hard-codes them), on the meta tree with an
    ``x_embedder`` taking the 128 control channels: each diffusers layer gets the ΔW (through a random probe
    P: ΔW·P), Δb and set norm that diffusers' ``_convert_bfl_flux_control_lora_to_diffusers`` gives it. The
    final adaLN is checked against fp64 instead: that converter swaps the halves of ``lora_A`` too (the rank
    rows, without B's columns), which changes the product; the engine swaps ΔW's output rows only."""
    from diffusers import FluxPipeline

    from lora_engine.patch.plan import resolve
    from tests.fixtures.models.flux import FLUX_DEV

    model = flux_model(FLUX_DEV, meta=True)
    nshapes = {k: tuple(v.shape) for k, v in native_state(model).items()}
    dshapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dshapes["x_embedder.weight"] = (3072, 128)
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for key, shape in nshapes.items():
        module, _, param = key.rpartition(".")
        if param == "scale":
            tensors[key] = (1 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        elif param == "weight" and len(shape) == 2:
            i = 128 if module == "img_in" else shape[1]
            tensors[f"{module}.lora_A.weight"] = (0.1 * torch.randn(2, i, generator=g)).to(torch.bfloat16)
            tensors[f"{module}.lora_B.weight"] = (0.1 * torch.randn(shape[0], 2, generator=g)).to(torch.bfloat16)
            tensors[f"{module}.lora_B.bias"] = (0.1 * torch.randn(shape[0], generator=g)).to(torch.bfloat16)
    path = tmp_path / "control-full.safetensors"
    save_file(tensors, str(path))
    probes: dict[int, torch.Tensor] = {}

    def probe(width):
        return probes.setdefault(width, torch.randn(width, 3, generator=torch.Generator().manual_seed(width),
                                                    dtype=torch.float64))

    lf = load_lora(path)
    assert not lf.unknown_keys and not lf.problems
    ours: dict[str, torch.Tensor] = {}
    for name, ma, target, why in resolve(lf, build_keymap(dshapes)):
        assert target is not None and why is None, (name, why)
        a, key = ma.adapter, target.weight_key
        if a.kind == "set":
            ours[key] = a.value.double()
            continue
        rows = target.rows or (0, dshapes[key][0])
        bias = key[:-len("weight")] + "bias"
        ours.setdefault(key, torch.zeros(dshapes[key][0], 3, dtype=torch.float64))
        ours.setdefault(bias, torch.zeros(dshapes[key][0], dtype=torch.float64))
        ours[key][rows[0]:rows[1]] += a.scale * (a.up.double() @ (a.down.double() @ probe(a.down.shape[1])))
        ours[bias][rows[0]:rows[1]] += a.scale * a.up_bias.double()
    theirs: dict[str, torch.Tensor] = {}
    for k, v in FluxPipeline.lora_state_dict(str(path)).items():
        module = k.removeprefix("transformer.")
        if module.endswith("lora_A.weight"):
            m = module[: -len(".lora_A.weight")]
            theirs[m + ".weight"] = (None, v)
        elif module.endswith("lora_B.bias"):
            theirs[module[: -len("lora_B.bias")] + "bias"] = v.double()
        elif module.endswith("lora_B.weight"):
            theirs.setdefault(module[: -len(".lora_B.weight")] + ".weight.B", v)
        else:
            theirs[module] = v.double()
    for key in [k for k in theirs if k.endswith(".weight.B")]:
        w = key[: -len(".B")]
        a = theirs[w][1].double()
        theirs[w] = theirs.pop(key).double() @ (a @ probe(a.shape[1]))
    assert set(ours) == set(theirs) and len(ours) > 900
    for k, want in theirs.items():
        if k == "norm_out.linear.weight":
            continue
        assert torch.allclose(ours[k], want, atol=1e-9), k
    t = {k: v.double() for k, v in tensors.items() if k.startswith("final_layer.adaLN_modulation.1.")}
    dn = t["final_layer.adaLN_modulation.1.lora_B.weight"] @ (t["final_layer.adaLN_modulation.1.lora_A.weight"] @ probe(3072))
    h = dn.shape[0] // 2
    assert torch.allclose(ours["norm_out.linear.weight"], torch.cat([dn[h:], dn[:h]]), atol=1e-9)
    assert not torch.allclose(theirs["norm_out.linear.weight"], ours["norm_out.linear.weight"], atol=1e-3)


def test_onthefly_sets_norms_for_the_forward_only(models, tmp_path):
    """On the fly, a diffusers RMSNorm (``attn.norm_q``) runs with the file's tensor exactly while the LoRA is
    on (factor ≠ 0), with its own weight at factor 0, and its parameter is never written."""
    d, _ = models
    path, t = control_file(d, shapes_of(NativeTree(native_state(d))), tmp_path / "c.safetensors", 3, wider=False)
    norm = d.transformer_blocks[0].attn.norm_q
    x = torch.randn(2, 5, norm.weight.shape[0], generator=torch.Generator().manual_seed(2))
    original = norm.weight.detach().clone()
    with torch.no_grad():
        base = norm(x)
        e = LoraEngine(d, build_keymap(shapes_of(d)), mode="onthefly")
        e.set_stack([StackEntry(load_lora(path), unet=0.3)])
        on = norm(x)
        e.set_factor(e.stack[0].ident, 0.0)
        off = norm(x)
        e.restore()
        norm.weight.copy_(t["double_blocks.0.img_attn.norm.query_norm.scale"])
        want = norm(x)
        norm.weight.copy_(original)
    assert torch.equal(on, want) and torch.equal(off, base) and not torch.equal(on, base)
    assert torch.equal(norm.weight, original)
