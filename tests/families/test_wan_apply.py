"""Wan 2.1/2.2 LoRAs on a tiny diffusers ``WanTransformer3DModel`` (I2V layers included) and on its native
tree (ComfyUI names), in the dialects Wan trainers write. Oracle: diffusers' ``WanPipeline.lora_state_dict``
(its native and musubi converters) -> ``load_lora_adapter``, peft merge. Full ``diff`` tensors on the
``modulation`` parameters, norms and the patch embedding (which diffusers drops) are checked against W + diff
in fp64. Also: the whole model's output on the fly = merged, restore bit-exact, other families untouched,
Wan 2.2's experts."""
from __future__ import annotations

import pytest
import torch

from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from tests.families.test_bad_input import _apply
from tests.families.test_flux_apply import _check, _close, _merged, _onthefly_equals_merged, diffusers_oracle
from tests.fixtures.files.dit import respell
from tests.fixtures.files.flux import native_lora, peft_file, write
from tests.fixtures.models.dit import wan_model
from tests.fixtures.models.flux import NativeTree, native_state

pytest.importorskip("diffusers")
pytest.importorskip("peft")

TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2", "proj_out", "time_proj"]


@pytest.fixture(scope="module")
def models():
    d = wan_model(seed=3)
    return d, NativeTree(native_state(d, "wan"))


def _pipeline():
    from diffusers import WanPipeline

    return WanPipeline


def _linears(nshapes, blocks_only=False) -> list[str]:
    mods = [k[: -len(".weight")] for k, s in nshapes.items() if k.endswith(".weight") and len(s) == 2]
    return [m for m in mods if m.startswith("blocks.")] if blocks_only else mods


def _with_bias_diffs(tensors: dict, modules: list[str], nshapes, seed: int, prefix: str) -> dict:
    """``<module>.diff_b`` next to the factors (lightx2v / CausVid files): Δb taken as it is."""
    g = torch.Generator().manual_seed(seed)
    for m in modules:
        tensors[f"{prefix}{m}.diff_b"] = torch.randn(nshapes[m + ".bias"], generator=g) * 0.1
    return tensors


def test_peft_diffusers_file(models, tmp_path):
    d, _ = models
    peft_file(d, tmp_path, seed=1, targets=TARGETS, pipeline=_pipeline())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    _check(models, path, diffusers_oracle(d, path, _pipeline()), family="wan")


@pytest.mark.parametrize("spelling", ["comfyui", "ai_toolkit"])
def test_native_dialects(models, tmp_path, spelling):
    """``diffusion_model.blocks.0.self_attn.q.lora_down`` + α (ComfyUI / Wan trainers) and ``…lora_A`` (ai-toolkit),
    with ``diff_b`` bias deltas on the blocks. diffusers' converter reads α only on the blocks (an α on the
    embeddings is left in its dict, and it refuses the file): there the files carry none (α = r)."""
    d, n = models
    nshapes = shapes_of(n)
    mods = _linears(nshapes)
    t = native_lora(nshapes, 5, mods, alpha=3.0 if spelling == "comfyui" else 4.0)
    t = respell(t, mods, spelling)
    for m in mods:
        if not m.startswith("blocks.") and spelling == "comfyui":
            del t[f"diffusion_model.{m}.alpha"]
    if spelling == "comfyui":
        _with_bias_diffs(t, _linears(nshapes, blocks_only=True), nshapes, 6, "diffusion_model.")
    path = write(t, tmp_path / f"{spelling}.safetensors")
    lf = load_lora(path)
    assert lf.unknown_keys == [] and len(lf.modules) == len(mods)
    _check(models, path, diffusers_oracle(d, path, _pipeline()), family="wan")


def test_musubi(models, tmp_path):
    """musubi-tuner ``lora_unet_blocks_0_self_attn_q`` (blocks only, α ≠ r): diffusers' musubi converter."""
    d, n = models
    nshapes = shapes_of(n)
    mods = _linears(nshapes, blocks_only=True)
    path = write(native_lora(nshapes, 7, mods, alpha=2.0), tmp_path / "musubi.safetensors")
    _check(models, path, diffusers_oracle(d, path, _pipeline()), family="wan")


@pytest.mark.parametrize("spelling", ["wan_fun", "lycoris", "bare"])
def test_other_spellings(models, tmp_path, spelling):
    """Wan "Fun" ``lora_unet__blocks_0_…`` (double ``_``), LyCORIS ``lycoris_blocks_0_…`` and DiffSynth bare
    ``blocks.0.self_attn.q.lora_A`` (no diffusers reader): the same ΔW as the kohya / ComfyUI spelling."""
    d, n = models
    nshapes = shapes_of(n)
    mods = _linears(nshapes)
    t = native_lora(nshapes, 8, mods, alpha=4.0)
    ref = write(t, tmp_path / "ref.safetensors")
    other = write(respell(t, mods, spelling), tmp_path / "other.safetensors")
    for root in (d, n):
        want, _ = _merged(root, ref)
        got, rep = _merged(root, other)
        assert rep.unmatched == [] and rep.touched == len(mods), rep.line()
        assert [k for k in want if not torch.equal(got[k], want[k])] == []


def _full_diffs(nshapes, seed: int) -> dict[str, torch.Tensor]:
    """``diff`` on every block's ``modulation``, ``head.modulation``, the cross-attention norm (+ ``diff_b``) and
    the patch embedding (Conv3d), as full-finetune extractions and distilled LoRAs ship them."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, s in nshapes.items():
        if key.endswith("modulation") or key.startswith("patch_embedding.") or ".norm3." in key:
            module, param = (key, "") if key.endswith("modulation") else key.rsplit(".", 1)
            role = "diff_b" if param == "bias" else "diff"
            out[f"diffusion_model.{module}.{role}"] = torch.randn(s, generator=g, dtype=torch.float64).float() * 0.1
    return out


def test_full_diffs_on_parameters(models, tmp_path):
    """W' = W + diff (fp64) on both trees, whatever the parameter is (nn.Parameter, norm, Conv3d)."""
    d, n = models
    nshapes = shapes_of(n)
    t = _full_diffs(nshapes, 9)
    path = write(t, tmp_path / "diff.safetensors")
    got_n, rep = _merged(n, path)
    assert rep.unmatched == [] and rep.touched == len({k.rsplit(".", 1)[0] for k in t}), rep.line()
    base = n.state_dict()
    for key, s in nshapes.items():
        module, param = (key, "") if key.endswith("modulation") else key.rsplit(".", 1)
        diff = t.get(f"diffusion_model.{module}.{'diff_b' if param == 'bias' else 'diff'}")
        want = base[key].double() + (0 if diff is None else diff.double())
        assert torch.allclose(got_n[key].double(), want, atol=1e-7, rtol=0), key
    got_d, rep = _merged(d, path)
    assert rep.unmatched == []
    m = wan_model(seed=3)
    m.load_state_dict(got_d)
    _close(got_n, native_state(m, "wan"), "native vs diffusers")


def _forward(model):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 2, 4, 4)
    return model(hidden_states=x, timestep=torch.tensor([3, 700]), encoder_hidden_states=torch.randn(2, 5, 16),
                 encoder_hidden_states_image=torch.randn(2, 3, 8), return_dict=False)[0]


def test_model_output_onthefly_equals_merged(models, tmp_path):
    """The whole diffusers model run with a LoRA + diff_b + modulation/norm/patch-embedding diffs: on the fly
    (per-sample factors too) = merged; the stored weights never change on the fly; restore bit-exact."""
    d, n = models
    nshapes = shapes_of(n)
    mods = _linears(nshapes)
    t = respell(native_lora(nshapes, 10, mods, alpha=2.0), mods, "comfyui")
    t.update(_with_bias_diffs({}, _linears(nshapes, blocks_only=True), nshapes, 11, "diffusion_model."))
    t.update(_full_diffs(nshapes, 12))
    lf = load_lora(write(t, tmp_path / "all.safetensors"))
    km = build_keymap(shapes_of(d))
    before = {k: v.clone() for k, v in d.state_dict().items()}
    with torch.no_grad():
        base = _forward(d)
        e = LoraEngine(d, km, mode="merged")
        e.set_stack([StackEntry(lf, unet=0.8)])
        merged = _forward(d)
        e.restore()
        fly = LoraEngine(d, km, mode="onthefly")
        fly.set_stack([StackEntry(lf, unet=0.8)])
        assert all(torch.equal(before[k], v) for k, v in d.state_dict().items())
        ontf = _forward(d)
        fly.restore()
    assert not torch.allclose(merged, base, atol=1e-3)
    assert torch.allclose(ontf, merged, atol=1e-5), (ontf - merged).abs().max()
    assert all(torch.equal(before[k], v) for k, v in d.state_dict().items())


@pytest.mark.parametrize("tree", ["diffusers", "native"])
def test_onthefly_equals_merged_per_layer(models, tmp_path, tree):
    d, n = models
    nshapes = shapes_of(n)
    _onthefly_equals_merged(d if tree == "diffusers" else n,
                            write(native_lora(nshapes, 13, _linears(nshapes)), tmp_path / "k.safetensors"))


def test_other_families_untouched(tmp_path):
    """A Qwen-Image LoRA on Wan and a Wan LoRA on Qwen-Image: one line naming the family, nothing changed."""
    from tests.fixtures.models.dit import qwen_model

    qwen, wan = qwen_model(seed=1), wan_model(seed=1)
    qs = shapes_of(qwen)
    qpath = write(native_lora(qs, 3, [k[:-7] for k, s in qs.items() if k.endswith(".weight") and len(s) == 2]),
                  tmp_path / "q.safetensors")
    lines, changed = _apply(wan, qpath)
    assert changed == [] and len(lines) == 1 and "Qwen-Image LoRA on a Wan model" in lines[0], lines
    ns = shapes_of(NativeTree(native_state(wan, "wan")))
    wpath = write(native_lora(ns, 4, _linears(ns, blocks_only=True)), tmp_path / "w.safetensors")
    lines, changed = _apply(qwen, wpath)
    assert changed == [] and len(lines) == 1 and "Wan LoRA on a Qwen-Image model" in lines[0], lines


def test_wan22_experts():
    """Wan 2.2 A14B: each LoRA of a stack on the expert its name declares (or the one asked); a file for one
    expert asked for both goes to its own, with one line; a LoRA declaring none goes to both."""
    from lora_engine.families.wan import HIGH_NOISE, LOW_NOISE, assign_experts, lora_expert

    assert lora_expert("Wan2.2-Lightning_T2V-A14B-4steps-lora_HIGH_fp16") == HIGH_NOISE
    assert lora_expert("wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors") == LOW_NOISE
    assert lora_expert("high_noise_model") == HIGH_NOISE and lora_expert("style_LN") == LOW_NOISE
    assert lora_expert("Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32") is None
    assert lora_expert("highlights_lowkey") is None and lora_expert("high_and_low") is None
    stack = [("lightning_HIGH", "both"), ("lightning_LOW", None), ("style", None), ("detail_high_noise", LOW_NOISE)]
    experts, lines = assign_experts(stack)
    assert experts == {HIGH_NOISE: ["lightning_HIGH", "style"], LOW_NOISE: ["lightning_LOW", "style", "detail_high_noise"]}
    assert len(lines) == 2 and all("\n" not in x for x in lines)
    assert lines[0] == "lightning_HIGH: made for the high-noise expert; applied to that expert only, not to both"
    assert "detail_high_noise: made for the high-noise expert, applied to the low-noise one as asked" == lines[1]


def test_wan22_stack_on_two_experts(tmp_path):
    """A stack on Wan 2.2's two experts (two models of one tree): each LoRA lands on the expert(s)
    ``assign_experts`` gives it (HIGH file: self-attention, LOW file: FFN, an undeclared style: cross-attention)."""
    from lora_engine.families.wan import HIGH_NOISE, LOW_NOISE, assign_experts

    experts = {HIGH_NOISE: wan_model(seed=5), LOW_NOISE: wan_model(seed=6)}
    ns = shapes_of(NativeTree(native_state(experts[HIGH_NOISE], "wan")))
    parts = {"lightning_HIGH": "self_attn", "lightning_LOW": "ffn", "style": "cross_attn"}
    files = {name: load_lora(write(native_lora(ns, i, [m for m in _linears(ns, blocks_only=True) if f".{part}." in m]),
                                   tmp_path / f"{name}.safetensors"))
             for i, (name, part) in enumerate(parts.items())}
    stacks, lines = assign_experts([(name, "both" if name == "lightning_HIGH" else None) for name in files])
    assert len(lines) == 1 and lines[0].startswith("lightning_HIGH: made for the high-noise expert")
    for expert, model in experts.items():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        e = LoraEngine(model, build_keymap(shapes_of(model)), mode="merged")
        e.set_stack([StackEntry(files[name]) for name in stacks[expert]])
        changed = {k.split(".")[2] for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
        e.restore()
        assert changed == ({"attn1", "attn2"} if expert == HIGH_NOISE else {"ffn", "attn2"}), (expert, changed)
