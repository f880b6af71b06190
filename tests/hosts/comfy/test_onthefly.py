"""The nodes' on-the-fly mode: LoRAs injected as side paths at each run (ComfyUI's ``set_injections``), weights
never written, strengths runtime factors.

Checked on the tiny SD1 model (the UNet's output, the CLIP's CONDITIONING) and on Flux.1 in ComfyUI naming
(every Linear of the native tree, fused ``qkv``/``linear1`` reached by split LoRAs, CLIP-L and T5):
on the fly = merged within fp32 tolerance; while the LoRAs run every base weight is bit-identical (same
tensor, same version counter); a strength change loaded the way ComfyUI keeps a model loaded between runs
writes no weight and keeps the built side paths (the merged mode, like ComfyUI's LoraLoader, re-patches
every LoRA weight)."""
from __future__ import annotations

import pytest
import torch

from comfy_nodes import onthefly
from comfy_nodes.loader import LoraEngineLoader, LoraEngineLoaderModelOnly
from comfy_nodes.prompt_tags import LoraEnginePromptTags
from comfy_nodes.stack import LoraEngineStack
from tests.fixtures.files.comfy import kohya_lora, lycoris_file
from tests.fixtures.files.flux import flux_modules, native_lora, peft_file, write
from tests.hosts.comfy.dit_models import comfy_dit
from tests.hosts.comfy.standin import load_model_gpu

FLY = onthefly.ONTHEFLY


def _params(patcher) -> dict:
    """Each parameter's identity and in-place version counter: any write changes one of them."""
    return {k: (id(v), v._version) for k, v in patcher.model.named_parameters()}


def _base(patcher) -> dict:
    return {k: v.detach().clone() for k, v in patcher.model_state_dict().items()}


def _inputs(m):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 10, m.unet.config.cross_attention_dim, generator=g))


def _unet(patcher, m):
    """The UNet's output for a run of ``patcher`` (loaded as ComfyUI loads it; the ldm view shares the modules)."""
    load_model_gpu(patcher)
    with torch.no_grad():
        return m.unet(*_inputs(m)).sample


def _encode(clip):
    return clip.encode_from_tokens_scheduled(clip.tokenize("a cat on a mat"))[0][0]


def _side_paths(patcher) -> dict:
    runner = onthefly.runner_for(patcher.model)
    return {(p, k): v[0] for p, h in runner.hooks.items() for k, v in h.fused_cache.items()}


@pytest.fixture
def sd1_files(loras, sd1):
    _, _, m = sd1
    kohya_lora(loras / "k.safetensors", m)
    lycoris_file(loras / "loha.safetensors", m, "loha")
    return loras


def test_sd1_on_the_fly_equals_merged(sd1_files, sd1):
    model, clip, m = sd1
    base, base_clip = _base(model), _base(clip.patcher)
    merged_model, merged_clip = LoraEngineLoader().load(model, clip, "k.safetensors", 0.8, -0.5)
    fly_model, fly_clip = LoraEngineLoader().load(model, clip, "k.safetensors", 0.8, -0.5, "", FLY)
    assert not fly_model.patches and not fly_clip.patcher.patches  # no weight patch at all
    assert fly_model.patches_uuid == model.patches_uuid  # ComfyUI sees the input's weights
    merged = _unet(merged_model, m)
    plain = _unet(model, m)  # (restores the merged weights)
    before = _params(model)
    fly = _unet(fly_model, m)  # runs with the side paths injected
    assert _params(model) == before and all(torch.equal(v, base[k]) for k, v in model.model_state_dict().items())
    assert torch.allclose(fly, merged, atol=2e-5, rtol=0) and (merged - plain).abs().max() > 1e-2
    enc_merged, enc_fly = _encode(merged_clip), _encode(fly_clip)
    assert torch.allclose(enc_fly, enc_merged, atol=2e-5, rtol=0) and (enc_merged - _encode(clip)).abs().max() > 1e-3
    assert all(torch.equal(v, base_clip[k]) for k, v in clip.patcher.model_state_dict().items())
    assert torch.equal(_unet(model, m), plain)  # ejected: the plain model again


def test_strength_change_writes_nothing_and_keeps_side_paths(sd1_files, sd1):
    model, clip, m = sd1
    writes = model.model.weight_writes
    (first,) = LoraEngineLoaderModelOnly().load(model, "k.safetensors", 0.5, "", FLY)
    _unet(first, m)
    built, before = _side_paths(model), _params(model)
    assert len(built) > 20
    (second,) = LoraEngineLoaderModelOnly().load(model, "k.safetensors", -0.9, "", FLY)  # the node re-run
    fly = _unet(second, m)
    assert model.model.weight_writes == writes and _params(model) == before  # nothing written
    after = _side_paths(model)
    assert after.keys() == built.keys() and all(after[k] is built[k] for k in built)  # nothing rebuilt
    (merged,) = LoraEngineLoaderModelOnly().load(model, "k.safetensors", -0.9)
    assert torch.allclose(fly, _unet(merged, m), atol=2e-5, rtol=0)
    # the merged mode, as ComfyUI's LoraLoader: a strength change re-patches every LoRA weight
    (merged2,) = LoraEngineLoaderModelOnly().load(model, "k.safetensors", 0.4)
    writes = model.model.weight_writes
    _unet(merged2, m)
    assert model.model.weight_writes - writes == len(merged2.patches) > 20
    _unet(model, m)


def test_chained_and_stacked_on_the_fly_nodes(sd1_files, sd1):
    """Two chained on-the-fly loaders are one injection over both LoRAs (the same LoRA twice keeps two
    strengths); the stack and prompt-tag nodes take the mode too; all equal the merged stack."""
    model, clip, m = sd1
    (a,) = LoraEngineLoaderModelOnly().load(model, "k.safetensors", 0.6, "", FLY)
    (ab,) = LoraEngineLoaderModelOnly().load(a, "loha.safetensors", -0.7, "", FLY)
    (abk,) = LoraEngineLoaderModelOnly().load(ab, "k.safetensors", 0.3, "", FLY)
    assert len(abk.injections[onthefly.KEY]) == 1
    chained = _unet(abk, m)
    merged, _ = LoraEngineStack().apply(model, None, lora_1="k.safetensors", strength_model_1=0.9,
                                        lora_2="loha.safetensors", strength_model_2=-0.7)
    want = _unet(merged, m)
    assert torch.allclose(chained, want, atol=2e-5, rtol=0)
    stacked, _ = LoraEngineStack().apply(model, None, mode=FLY, lora_1="k.safetensors", strength_model_1=0.9,
                                         lora_2="loha.safetensors", strength_model_2=-0.7)
    assert torch.allclose(_unet(stacked, m), want, atol=2e-5, rtol=0)
    tagged, tagged_clip, cond, _ = LoraEnginePromptTags().apply(model, clip, "a cat <lora:k:0.9:0.7>", 0, FLY)
    merged_tags, _, cond_merged, _ = LoraEnginePromptTags().apply(model, clip, "a cat <lora:k:0.9:0.7>")
    assert not tagged.patches and torch.allclose(cond[0][0], cond_merged[0][0], atol=2e-5, rtol=0)
    assert torch.allclose(_unet(tagged, m), _unet(merged_tags, m), atol=2e-5, rtol=0)
    _unet(model, m)


def test_mode_input_defaults_to_merged(loras):
    for cls in (LoraEngineLoader, LoraEngineLoaderModelOnly, LoraEngineStack, LoraEnginePromptTags):
        spec = cls.INPUT_TYPES()["optional"]["mode"]
        assert spec[0] == [onthefly.MERGED, FLY] and spec[1]["default"] == onthefly.MERGED


def _linear_outputs(patcher, xs) -> dict:
    """Each layer's output for a run of ``patcher`` (loaded as ComfyUI loads it)."""
    load_model_gpu(patcher)
    with torch.no_grad():
        return {p: patcher.model.get_submodule(p)(x) for p, x in xs.items()}


def test_flux_on_the_fly_equals_merged(loras, tmp_path):
    """Fused qkv/linear1 reached by a kohya file and by diffusers' split to_q/to_k/to_v/proj_mlp (row-placed
    side paths), every Linear of the native tree, CLIP-L and T5; then a strength change writes nothing."""
    model, clip, d = comfy_dit("flux", seed=5)
    nshapes = {k[len("diffusion_model."):]: tuple(v.shape) for k, v in model.model_state_dict().items()}
    t5 = "lora_te2_encoder_block_0_layer_0_SelfAttention_q"
    te = {t5 + ".lora_down.weight": torch.randn(4, 32) * 0.1, t5 + ".lora_up.weight": torch.randn(32, 4) * 0.1,
          "lora_te1_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": torch.randn(4, 32) * 0.1,
          "lora_te1_text_model_encoder_layers_1_mlp_fc1.lora_up.weight": torch.randn(64, 4) * 0.1}
    write({**native_lora(nshapes, 1, flux_modules(nshapes)), **te}, loras / "kohya.safetensors")
    peft_file(d, tmp_path, seed=2)
    (loras / "peft.safetensors").write_bytes((tmp_path / "pytorch_lora_weights.safetensors").read_bytes())
    g = torch.Generator().manual_seed(3)
    xs = {p: torch.randn(3, mod.in_features, generator=g) for p, mod in model.model.named_modules()
          if isinstance(mod, torch.nn.Linear)}
    kw = dict(lora_1="kohya.safetensors", strength_model_1=0.7, strength_clip_1=1.1,
              lora_2="peft.safetensors", strength_model_2=-0.4)
    merged_model, merged_clip = LoraEngineStack().apply(model, clip, **kw)
    fly_model, fly_clip = LoraEngineStack().apply(model, clip, mode=FLY, **kw)
    merged = _linear_outputs(merged_model, xs)
    plain, before = _linear_outputs(model, xs), _params(model)
    fly = _linear_outputs(fly_model, xs)
    assert _params(model) == before
    moved = [p for p in xs if not torch.allclose(merged[p], plain[p])]
    assert len(moved) > 10 and any(p.endswith("img_attn.qkv") for p in moved) and any(p.endswith("linear1") for p in moved)
    for p in xs:
        assert torch.allclose(fly[p], merged[p], atol=2e-5, rtol=0), p
    enc_fly, enc_merged = _encode(fly_clip), _encode(merged_clip)
    assert torch.allclose(enc_fly, enc_merged, atol=2e-5, rtol=0) and (enc_merged - _encode(clip)).abs().max() > 1e-3
    # a strength change between runs: ComfyUI loads the new clone; nothing written, nothing rebuilt
    built, writes = _side_paths(model), model.model.weight_writes
    kw["strength_model_1"] = 1.5
    (fly2, _), (merged2, _) = LoraEngineStack().apply(model, clip, mode=FLY, **kw), LoraEngineStack().apply(model, clip, **kw)
    fly_out = _linear_outputs(fly2, xs)
    assert model.model.weight_writes == writes and _params(model) == before
    assert all(_side_paths(model)[k] is v for k, v in built.items())
    want = _linear_outputs(merged2, xs)
    assert all(torch.allclose(fly_out[p], want[p], atol=2e-5, rtol=0) for p in xs)
    assert not all(torch.allclose(fly_out[p], fly[p], atol=2e-5, rtol=0) for p in xs)
    _linear_outputs(model, xs)
