"""Flux LoRAs applied by the engine on a tiny diffusers ``FluxTransformer2DModel`` (separate q/k/v) and on
the native tree of the same weights (fused ``qkv``/``linear1``, ``[shift; scale]`` final adaLN), in the
dialects people download. Oracle: diffusers' own loader (``FluxPipeline.lora_state_dict`` ->
``load_lora_adapter``), its PEFT layers merged by peft. Checked: merged weights = the oracle's (fp32,
atol 1e-6 on weights of size ~0.1), native merged = diffusers merged through the declaration's row
layout, on the fly = merged (layer outputs), restore bit-exact."""
from __future__ import annotations

import copy

import pytest
import torch

from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from tests.fixtures.files.flux import flux_modules, native_lora, peft_file, write
from tests.fixtures.models.flux import NativeTree, flux_model, native_state

pytest.importorskip("diffusers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def models():
    d = flux_model(seed=3)
    return d, NativeTree(native_state(d))


def diffusers_oracle(model, path, pipeline=None) -> dict[str, torch.Tensor]:
    """The state dict diffusers' own loader gives: lora_state_dict -> load_lora_adapter -> peft merge."""
    from diffusers import FluxPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipeline = pipeline or FluxPipeline
    m = copy.deepcopy(model)
    if pipeline is FluxPipeline:
        sd, alphas, meta = pipeline.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
    else:  # SD3's mixin has no network alphas
        (sd, meta), alphas = pipeline.lora_state_dict(str(path), return_lora_metadata=True), None
    # diffusers 0.42's kohya converter names the top-level layers (x_embedder, context_embedder, proj_out,
    # norm_out.linear) without the "transformer." prefix, so its own loader then drops them silently:
    # keep its math, restore the prefix
    sd = {k if k.startswith("transformer.") else "transformer." + k: v for k, v in sd.items()}
    m.load_lora_adapter(sd, prefix="transformer", network_alphas=alphas, metadata=meta, adapter_name="x")
    for mod in m.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.merge()
    out = {}
    for k, v in m.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer", "")] = v
    return out


def _merged(root, path, strength=1.0):
    engine = LoraEngine(root, build_keymap(shapes_of(root)), mode="merged")
    before = {k: v.clone() for k, v in root.state_dict().items()}
    plan = engine.set_stack([StackEntry(load_lora(path), unet=strength)])
    after = {k: v.clone() for k, v in root.state_dict().items()}
    report = next(iter(plan.reports.values()))
    engine.restore()
    assert all(torch.equal(before[k], v) for k, v in root.state_dict().items()), "restore is not bit-exact"
    return after, report


def _close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for k, w in want.items():
        assert torch.allclose(got[k], w, atol=1e-6, rtol=0), f"{what}: {k} max err {(got[k] - w).abs().max()}"


def _check(models, path, want_diffusers, family="flux"):
    d, n = models
    got_d, rep = _merged(d, path)
    assert rep.unmatched == [] and rep.touched, rep.line()
    _close(got_d, want_diffusers, "diffusers tree")
    got_n, rep = _merged(n, path)
    assert rep.unmatched == [] and rep.touched, rep.line()
    want_n = native_state(_loaded(d, want_diffusers), family)
    _close(got_n, want_n, "native tree")
    base = d.state_dict()
    assert any(not torch.equal(base[k], got_d[k]) for k in base if "to_q" in k), "the LoRA changed nothing"


def _loaded(model, state):
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return m


def test_peft_diffusers_file(models, tmp_path):
    d, _ = models
    path = tmp_path / "pytorch_lora_weights.safetensors"
    peft_file(d, tmp_path, seed=1)
    lf = load_lora(path)
    assert lf.format == "diffusers" and not lf.unknown_keys
    _check(models, path, diffusers_oracle(d, path))


@pytest.mark.parametrize("spelling", ["kohya", "comfyui"])
def test_native_dialects(models, tmp_path, spelling):
    """kohya ``lora_unet_double_blocks_0_img_attn_qkv`` and ComfyUI ``diffusion_model.double_blocks.0…``:
    diffusers' kohya converter is the oracle (it splits ``linear1`` at Flux's real width 3072, so its
    single-block part is checked at full width in test_flux_converters; here double blocks + top)."""
    d, n = models
    nshapes = shapes_of(n)
    mods = [m for m in flux_modules(nshapes) if not m.startswith("single_blocks")]
    tensors = native_lora(nshapes, 5, mods, spelling=spelling)
    # diffusers' converter ignores α on final_layer ("TODO: alphas"): there, α = r (scale 1) keeps it an oracle
    for k in [k for k in tensors if "final_layer" in k and k.endswith(".alpha")]:
        tensors[k] = torch.tensor(4.0)
    path = write(tensors, tmp_path / f"{spelling}.safetensors")
    _check(models, path, diffusers_oracle(d, path))


def test_final_adaln_scale_and_swap(models, tmp_path):
    """final_layer.adaLN_modulation.1 with α ≠ r on the diffusers model: ΔW = swap(α/r · up · down),
    computed here by hand (the converter above leaves α out for this layer)."""
    d, n = models
    nshapes = shapes_of(n)
    t = native_lora(nshapes, 11, ["final_layer.adaLN_modulation.1"], alpha=3.0)
    path = write(t, tmp_path / "f.safetensors")
    got, rep = _merged(d, path)
    assert rep.unmatched == []
    up, down = t["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"], t["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"]
    dn = (3.0 / 4) * up.double() @ down.double()
    h = dn.shape[0] // 2
    want = d.state_dict()["norm_out.linear.weight"].double() + torch.cat([dn[h:], dn[:h]])
    assert torch.allclose(got["norm_out.linear.weight"].double(), want, atol=1e-6)


def test_native_dialect_with_single_blocks(models, tmp_path):
    """linear1 (q,k,v,mlp) split onto the diffusers model = the same file on the native tree."""
    d, n = models
    nshapes = shapes_of(n)
    path = write(native_lora(nshapes, 6, flux_modules(nshapes)), tmp_path / "k.safetensors")
    got_d, rep = _merged(d, path)
    assert rep.unmatched == []
    got_n, rep = _merged(n, path)
    assert rep.unmatched == []
    want_n = native_state(_loaded(d, got_d))
    _close(got_n, want_n, "native vs diffusers")


def _outputs(root, linears, x_of):
    return {p: root.get_submodule(p)(x_of(p)) for p in linears}


def _onthefly_equals_merged(root, path):
    torch.manual_seed(0)
    linears = [p for p, m in root.named_modules() if isinstance(m, torch.nn.Linear)]
    xs = {p: torch.randn(3, root.get_submodule(p).in_features) for p in linears}
    km = build_keymap(shapes_of(root))
    lf = load_lora(path)
    before = {k: v.clone() for k, v in root.state_dict().items()}
    with torch.no_grad():
        base = _outputs(root, linears, xs.get)
        merged_engine = LoraEngine(root, km, mode="merged")
        merged_engine.set_stack([StackEntry(lf, unet=0.7)])
        merged = _outputs(root, linears, xs.get)
        merged_engine.restore()
        fly = LoraEngine(root, km, mode="onthefly")
        fly.set_stack([StackEntry(lf, unet=0.7)])
        ontf = _outputs(root, linears, xs.get)
        fly.set_factor(fly.stack[0].ident, torch.tensor([1.0, 0.0, 0.5]))  # per-sample factors
        per_sample = _outputs(root, linears, xs.get)
        fly.restore()
    changed = 0
    for p in linears:
        assert torch.allclose(ontf[p], merged[p], atol=1e-5), p
        assert torch.allclose(per_sample[p][1], base[p][1], atol=1e-6), p
        changed += not torch.allclose(merged[p], base[p])
    assert changed > 5
    assert all(torch.equal(before[k], v) for k, v in root.state_dict().items())


@pytest.mark.parametrize("tree", ["diffusers", "native"])
def test_onthefly_equals_merged(models, tmp_path, tree):
    d, n = models
    nshapes = shapes_of(n)
    both = {**native_lora(nshapes, 7, flux_modules(nshapes)), **{}}
    path = write(both, tmp_path / "k.safetensors")
    peft_file(d, tmp_path, seed=2)
    for p in (path, tmp_path / "pytorch_lora_weights.safetensors"):
        _onthefly_equals_merged(d if tree == "diffusers" else n, p)


def test_fused_and_split_loras_on_one_weight(models, tmp_path):
    """A kohya qkv LoRA and a diffusers to_q LoRA in one stack on the native tree: one slot over the
    fused weight (one fp32 sum, one rounding) = each applied alone, added; switching and restore exact."""
    d, n = models
    nshapes = shapes_of(n)
    fused = write(native_lora(nshapes, 8, ["double_blocks.0.img_attn.qkv"]), tmp_path / "fused.safetensors")
    peft_file(d, tmp_path, seed=9, targets=["to_q"])
    split = str(tmp_path / "pytorch_lora_weights.safetensors")
    km = build_keymap(shapes_of(n))
    before = {k: v.clone() for k, v in n.state_dict().items()}
    key = "double_blocks.0.img_attn.qkv.weight"
    e = LoraEngine(n, km, mode="merged")
    a, b = load_lora(fused), load_lora(split)
    e.set_stack([StackEntry(a)])
    wa = n.state_dict()[key].clone()
    e.set_stack([StackEntry(b)])
    wb = n.state_dict()[key].clone()
    e.set_stack([StackEntry(a), StackEntry(b)])
    both = n.state_dict()[key].clone()
    # block 0's qkv: one slot over the whole weight; the single block's to_q: its row slice of linear1
    assert sorted(e.plan.contributions) == [key, "single_blocks.0.linear1.weight[0:32]"]
    assert len(e.plan.contributions[key]) == 2
    w0 = before[key]
    assert torch.allclose(both - w0, (wa - w0) + (wb - w0), atol=1e-6)
    e.set_stack([StackEntry(b)])
    assert torch.equal(n.state_dict()[key], wb)
    e.restore()
    assert all(torch.equal(before[k], v) for k, v in n.state_dict().items())


def test_xlabs(models, tmp_path):
    """x-flux files (``processor.qkv_lora1``…, single-block ``qkv_lora`` on linear1's q,k,v rows only):
    diffusers' XLabs converter is the oracle."""
    from tests.fixtures.files.flux import xlabs_lora

    d, n = models
    path = write(xlabs_lora(shapes_of(n), 12), tmp_path / "xlabs.safetensors")
    lf = load_lora(path)
    assert lf.format == "xlabs" and not lf.unknown_keys and len(lf.modules) == 6
    _check(models, path, diffusers_oracle(d, path))


@pytest.mark.parametrize("spelling", ["fal", "onetrainer", "lycoris", "bare"])
def test_other_prefixes(models, tmp_path, spelling):
    """fal Kontext ``base_model.model.<native>.lora_A``, OneTrainer ``lora_transformer_<diffusers with _>``,
    LyCORIS ``lycoris_<diffusers with _>``, DiffSynth bare ``<diffusers>.lora_A``: the same deltas as
    the kohya/PEFT spellings of the same tensors."""
    d, n = models
    nshapes = shapes_of(n)
    if spelling == "fal":
        base = native_lora(nshapes, 13, flux_modules(nshapes), alpha=4.0)  # α = r: PEFT files carry none
        renamed = {k.replace("lora_unet_", "base_model.model.").replace(".lora_down", ".lora_A").replace(".lora_up", ".lora_B"): v
                   for k, v in base.items() if not k.endswith(".alpha")}
        for k in list(renamed):  # native dotted paths
            head, _, tail = k.partition(".lora_")
            renamed[_native_dots(head, nshapes) + ".lora_" + tail] = renamed.pop(k)
    else:
        peft_file(d, tmp_path, seed=14, alpha=4)
        base = load_lora_tensors(tmp_path / "pytorch_lora_weights.safetensors")
        renamed = {}
        for k, v in base.items():
            module, _, tail = k.removeprefix("transformer.").partition(".lora_")
            if spelling == "bare":
                renamed[f"{module}.lora_{tail}"] = v
            else:
                pre = "lora_transformer_" if spelling == "onetrainer" else "lycoris_"
                role = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[tail]
                renamed[f"{pre}{module.replace('.', '_')}.{role}"] = v
    ref = write(base, tmp_path / "ref.safetensors")
    other = write(renamed, tmp_path / "other.safetensors")
    for root in (d, n):
        want, rep = _merged(root, ref)
        assert rep.unmatched == []
        got, rep = _merged(root, other)
        assert rep.unmatched == [] and rep.touched, rep.line()
        assert [k for k in want if not torch.equal(got[k], want[k])] == []


def load_lora_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _native_dots(underscored: str, nshapes) -> str:
    """base_model.model.double_blocks_0_img_attn_qkv -> base_model.model.double_blocks.0.img_attn.qkv."""
    pre, _, rest = underscored.rpartition(".")
    for key in nshapes:
        module = key.rpartition(".")[0]
        if module.replace(".", "_") == rest:
            return f"{pre}.{module}"
    raise KeyError(rest)
