"""The nodes on ComfyUI's Flux.1, Chroma, SD3 and SD3.5-Medium models and their CLIP-L / CLIP-G / T5 encoders.

Oracle: what ComfyUI's own LoraLoader computes for the same file, rebuilt here independently in fp64
from the file's tensors and ComfyUI's documented rules (``comfy/lora.py`` ``model_lora_keys_unet`` /
``model_lora_keys_clip``, ``comfy/weight_adapter/lora.py``; see ../shared/reference/comfyui.md §2):

- names: ``lora_unet_<X with _>`` and ``diffusion_model.<X>`` for every ``diffusion_model.X.weight``;
  for Flux, ``transformer.<diffusers path>`` through ComfyUI's ``flux_to_diffusers`` rows (``to_q/k/v`` =
  thirds of ``img_attn.qkv``, ``add_*_proj`` of ``txt_attn.qkv``, single blocks' ``to_q/k/v`` and
  ``proj_mlp`` = row blocks of ``linear1``, ``norm_out.linear`` = the final adaLN with scale and shift
  halves swapped); CLIP-L ``lora_te1_text_model_encoder_layers_…``, CLIP-G ``lora_te2_…``; T5
  ``lora_te{N}_<key with _>`` with N = 1 + [clip_g] + [clip_l] (Flux: also ``lora_te2_``);
- math: ``W += s · (α / r) · up @ down`` (scale 1 without an ``alpha`` tensor) on the mapped rows.

Our nodes' merged weights equal it within fp32 rounding (atol 1e-6 on weights of size ~0.1), with the
same set of changed weights; restore is bit-exact.
"""
from __future__ import annotations

import pytest
import torch

from comfy_nodes.loader import LoraEngineLoader, LoraEngineLoaderModelOnly
from comfy_nodes.stack import LoraEngineStack
from tests.fixtures.files.flux import flux_modules, native_lora, peft_file, write
from tests.hosts.comfy.dit_models import ENCODERS, comfy_dit
from tests.hosts.comfy.helpers import patched_state

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

CLIP_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
T5_LEAVES = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.0.SelfAttention.o",
             "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wo")


@pytest.fixture(scope="module", params=["flux", "chroma", "sd3", "sd3.5-medium"])
def dit(request):
    return (request.param, *comfy_dit(request.param, seed=2))


def _state(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model_state_dict().items()}


# ---- ComfyUI's key rules, written out from its documentation -------------------------------------------------
def t5_prefixes(kind: str) -> tuple[str, ...]:
    """The kohya prefixes ComfyUI gives the T5 (``model_lora_keys_clip``)."""
    encs = ENCODERS[kind]
    n = 1 + ("clip_g" in encs) + ("clip_l" in encs)
    return ("lora_te2_", "lora_te3_") if n == 2 else (f"lora_te{n}_",)


def comfy_key_rules(kind: str, model_sd: dict, clip_sd: dict) -> dict[str, list[tuple]]:
    """LoRA module name -> [(state key, rows or None, swap halves)] for the names used in these tests."""
    rules: dict[str, list[tuple]] = {}
    for k in model_sd:
        if k.endswith(".weight"):
            x = k[len("diffusion_model."):-len(".weight")]
            rules["lora_unet_" + x.replace(".", "_")] = rules[f"diffusion_model.{x}"] = [(k, None, False)]
    for enc, te in (("clip_l", "lora_te1_"), ("clip_g", "lora_te2_")):
        for k in clip_sd:
            if k.startswith(f"{enc}.transformer.text_model.encoder.layers.") and k.endswith(".weight"):
                rules[te + k[len(f"{enc}.transformer."):-len(".weight")].replace(".", "_")] = [(k, None, False)]
    for k in clip_sd:
        if k.startswith("t5xxl.transformer.") and k.endswith(".weight"):
            for p in t5_prefixes(kind):
                rules[p + k[len("t5xxl.transformer."):-len(".weight")].replace(".", "_")] = [(k, None, False)]
    if kind == "flux":
        rules.update(flux_diffusers_rules(model_sd))
    return rules


def flux_diffusers_rules(model_sd: dict) -> dict[str, list[tuple]]:
    """ComfyUI's ``flux_to_diffusers`` rows as ``transformer.<diffusers path>`` names."""
    h = model_sd["diffusion_model.img_in.weight"].shape[0]
    dm = "diffusion_model."
    out = {}

    def put(d, native, rows=None, swap=False):
        out["transformer." + d] = [(dm + native + ".weight", rows, swap)]

    i = 0
    while f"{dm}double_blocks.{i}.img_attn.qkv.weight" in model_sd:
        t, n = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for j, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            put(t + "attn." + img, n + "img_attn.qkv", (j * h, (j + 1) * h))
            put(t + "attn." + txt, n + "txt_attn.qkv", (j * h, (j + 1) * h))
        for d, native in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                          ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"),
                          ("ff_context.net.2", "txt_mlp.2"), ("norm1.linear", "img_mod.lin"),
                          ("norm1_context.linear", "txt_mod.lin")):
            put(t + d, n + native)
        i += 1
    i = 0
    while f"{dm}single_blocks.{i}.linear1.weight" in model_sd:
        t, n = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        height = model_sd[f"{dm}{n}linear1.weight"].shape[0]
        for j, d in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            put(t + d, n + "linear1", (j * h, (j + 1) * h))
        put(t + "proj_mlp", n + "linear1", (3 * h, height))
        put(t + "proj_out", n + "linear2")
        put(t + "norm.linear", n + "modulation.lin")
        i += 1
    for d, native in (("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear")):
        put(d, native)
    put("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    return out


def comfy_loraloader_oracle(kind, tensors: dict, model_sd: dict, clip_sd: dict, s_model: float, s_clip: float):
    """fp64 weights ComfyUI's LoraLoader gives for these LoRA tensors (kohya/PEFT LoRA pairs)."""
    rules = comfy_key_rules(kind, model_sd, clip_sd)
    out = {k: v.double().clone() for k, v in {**model_sd, **clip_sd}.items()}
    modules = {}
    for k in tensors:
        for role in (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha"):
            if k.endswith(role):
                modules.setdefault(k[:-len(role)], {})[role] = tensors[k]
    for name, t in modules.items():
        down = (t.get(".lora_down.weight", t.get(".lora_A.weight"))).double()
        up = (t.get(".lora_up.weight", t.get(".lora_B.weight"))).double()
        scale = float(t[".alpha"]) / down.shape[0] if ".alpha" in t else 1.0
        for key, rows, swap in rules[name]:
            s = s_model if key.startswith("diffusion_model.") else s_clip
            delta = s * scale * (up @ down)
            if swap:
                half = delta.shape[0] // 2
                delta = torch.cat([delta[half:], delta[:half]])
            region = out[key] if rows is None else out[key][rows[0]:rows[1]]
            region += delta.reshape(region.shape)
    return out


# ---- LoRA files --------------------------------------------------------------------------------------------
def te_tensors(kind: str, clip_sd: dict, seed: int, r: int = 4, alpha: float = 2.0) -> dict:
    """kohya text-encoder LoRA tensors: CLIP-L ``lora_te1_``, CLIP-G ``lora_te2_``, T5 ComfyUI's first prefix."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in clip_sd.items():
        enc = k.split(".")[0]
        rel = k[len(enc) + len(".transformer."):-len(".weight")] if k.endswith(".weight") else None
        if rel is None or not rel.endswith(CLIP_LEAVES + T5_LEAVES):
            continue
        prefix = {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": t5_prefixes(kind)[0]}[enc]
        name = prefix + rel.replace(".", "_")
        out[name + ".lora_down.weight"] = torch.randn(r, w.shape[1], generator=g) * 0.1
        out[name + ".lora_up.weight"] = torch.randn(w.shape[0], r, generator=g) * 0.1
        out[name + ".alpha"] = torch.tensor(alpha)
    return out


def unet_modules(model_sd: dict) -> list[str]:
    """Every 2-D weight of the denoiser (kohya's full-coverage Flux/SD3 trainers reach these)."""
    return [k[len("diffusion_model."):-len(".weight")] for k, v in model_sd.items()
            if k.endswith(".weight") and v.ndim == 2]


def _check(ours: dict, want: dict, base: dict) -> int:
    changed = 0
    for k, v in ours.items():
        w = want[k]
        assert torch.allclose(v.double(), w, atol=1e-6, rtol=0), f"{k}: max err {(v.double() - w).abs().max():.3g}"
        moved = not torch.equal(w, base[k].double())
        assert moved == (not torch.equal(v, base[k])), k
        changed += moved
    return changed


def test_kohya_unet_and_text_encoders_match_comfyui(dit, loras):
    kind, model, clip, _ = dit
    msd, csd = _state(model), _state(clip.patcher)
    tensors = {**native_lora({k[len("diffusion_model."):]: tuple(v.shape) for k, v in msd.items()}, 5,
                             unet_modules(msd), alpha=3.0),
               **te_tensors(kind, csd, 6)}
    write(tensors, loras / "k.safetensors")
    new_model, new_clip = LoraEngineLoader().load(model, clip, "k.safetensors", 0.8, -0.6)
    ours = patched_state(new_model) | patched_state(new_clip.patcher)
    want = comfy_loraloader_oracle(kind, tensors, msd, csd, 0.8, -0.6)
    changed = _check(ours, want, {**msd, **csd})
    n_te = sum(k.endswith(".lora_down.weight") and k.startswith("lora_te") for k in tensors)
    assert changed == len(unet_modules(msd)) + n_te
    assert {k.split(".")[0] for k in new_clip.patcher.patches} == set(ENCODERS[kind])
    assert all(torch.equal(_state(model)[k], v) for k, v in msd.items())  # restored bit for bit
    assert not model.patches and not clip.patcher.patches  # the inputs were not touched


def test_flux_comfy_native_and_peft_files_match_comfyui(loras, tmp_path):
    model, clip, d = comfy_dit("flux", seed=3)
    msd, csd = _state(model), _state(clip.patcher)
    nshapes = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in msd.items()}
    native = native_lora(nshapes, 8, flux_modules(nshapes), spelling="comfy")
    write(native, loras / "native.safetensors")
    peft_file(d, tmp_path, seed=9, r=4, alpha=4)  # diffusers' writer; alpha = r: see the alpha test below
    (loras / "peft.safetensors").write_bytes((tmp_path / "pytorch_lora_weights.safetensors").read_bytes())
    from safetensors.torch import load_file

    peft = load_file(loras / "peft.safetensors")
    for name, tensors, s in (("native.safetensors", native, 0.7), ("peft.safetensors", peft, 1.3)):
        (new_model,) = LoraEngineLoaderModelOnly().load(model, name, s)
        want = comfy_loraloader_oracle("flux", tensors, msd, csd, s, 0.0)
        assert _check(patched_state(new_model), want, msd) > 10, name


def test_peft_alpha_in_metadata_is_a_documented_difference(loras, tmp_path):
    """diffusers/PEFT files keep ``lora_alpha`` in their adapter metadata, not as tensors. ComfyUI's loader
    reads only tensors (scale 1); lora-engine uses lora_alpha / r as diffusers and PEFT do."""
    model, clip, d = comfy_dit("flux", seed=3)
    msd = _state(model)
    peft_file(d, tmp_path, seed=9, r=4, alpha=8, targets=["to_q", "ff.net.2"])
    (loras / "p8.safetensors").write_bytes((tmp_path / "pytorch_lora_weights.safetensors").read_bytes())
    from safetensors.torch import load_file

    (new_model,) = LoraEngineLoaderModelOnly().load(model, "p8.safetensors", 1.0)
    ours = patched_state(new_model)
    comfy = comfy_loraloader_oracle("flux", load_file(loras / "p8.safetensors"), msd, {}, 1.0, 0.0)
    for k, v in ours.items():
        if not torch.equal(v, msd[k]):
            d_ours, d_comfy = v.double() - msd[k].double(), comfy[k] - msd[k].double()
            assert torch.allclose(d_ours, 2.0 * d_comfy, atol=1e-6), k  # alpha / r = 8 / 4


def test_stack_of_two_on_flux_is_one_sum(loras):
    model, clip, _ = comfy_dit("flux", seed=4)
    msd, csd = _state(model), _state(clip.patcher)
    nshapes = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in msd.items()}
    a = {**native_lora(nshapes, 1, flux_modules(nshapes)), **te_tensors("flux", csd, 2)}
    b = native_lora(nshapes, 3, flux_modules(nshapes), spelling="comfy")
    write(a, loras / "a.safetensors")
    write(b, loras / "b.safetensors")
    new_model, new_clip = LoraEngineStack().apply(model, clip, lora_1="a.safetensors", strength_model_1=0.5,
                                                  strength_clip_1=0.9, lora_2="b.safetensors", strength_model_2=-1.2)
    want_a = comfy_loraloader_oracle("flux", a, msd, csd, 0.5, 0.9)
    want = comfy_loraloader_oracle("flux", b, {k: want_a[k] for k in msd}, {k: want_a[k] for k in csd}, -1.2, 0.0)
    ours = patched_state(new_model) | patched_state(new_clip.patcher)
    assert _check(ours, want, {**msd, **csd}) > 20
    assert all(len(v) == 1 for v in new_model.patches.values())  # one patch per weight: one sum, one rounding


@pytest.mark.parametrize("mode", ["merged", "on the fly"])
def test_model_only_node_applies_a_flux_file_with_text_encoder_modules(loras, caplog, mode):
    """A model-only node has no CLIP: the file's ``lora_te1_``/``lora_te2_`` names are not unmatched, and not a
    sign of another family (``lora_te2_`` alone reads as SDXL's second encoder): the UNet part applies, quietly."""
    model, clip, _ = comfy_dit("flux", seed=6)
    msd, csd = _state(model), _state(clip.patcher)
    nshapes = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in msd.items()}
    tensors = {**native_lora(nshapes, 1, flux_modules(nshapes)), **te_tensors("flux", csd, 2)}
    write(tensors, loras / "k.safetensors")
    (new_model,) = LoraEngineLoaderModelOnly().load(model, "k.safetensors", 0.9, "", mode)
    assert not [r for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("lora_engine")]
    if mode == "merged":
        want = comfy_loraloader_oracle("flux", tensors, msd, csd, 0.9, 0.0)
        assert _check(patched_state(new_model), want, msd) == len(flux_modules(nshapes))
    else:
        assert new_model.injections and not new_model.patches
