"""Check the pack on Flux.1 inside a real ComfyUI (CPU; a random Flux of reduced width and depth in ComfyUI's own
classes, BFL naming, and a tiny real Flux CLIP: CLIP-L + T5; no weights downloaded).

    cd /path/to/ComfyUI && python /path/to/lora-engine/tests/hosts/comfy/comfyui_flux_smoke.py /path/to/lora-engine

ComfyUI's detector fixes a Flux checkpoint's width to Flux.1's 3072, so the model is built from ComfyUI's own
``supported_models.Flux`` with a small config (2 double + 2 single blocks, width 256 = 2 heads of 128) rather
than read from a file. For a kohya file (every 2-D weight, CLIP-L ``lora_te1_``, T5 ``lora_te2_``), a
ComfyUI-native ``diffusion_model.*`` file and a diffusers-named ``transformer.*`` file (split ``to_q/k/v``,
``proj_mlp`` on the fused ``qkv``/``linear1``, ``norm_out.linear``) it compares the weights ComfyUI runs with
after our loader against ComfyUI's own LoraLoader, then the on-the-fly mode: the model's output equals the
merged one, and a strength change loaded through ``load_models_gpu`` writes no weight. Prints one line per
check, exits non-zero on a failed one. Run by ``test_real_comfyui.py`` when ``LORA_ENGINE_COMFYUI`` is set.
"""
import asyncio, logging, os, sys, tempfile
sys.path.insert(0, os.getcwd())
PACK = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join("custom_nodes", "lora-engine"))
sys.path.insert(1, PACK)  # this checkout's lora_engine
from comfy.cli_args import args
args.cpu = True
import torch
import comfy.model_management, comfy.model_patcher, comfy.sd, comfy.supported_models, comfy.utils
import comfy.text_encoders.flux
from comfy.supported_models_base import ClipTarget
import folder_paths, nodes
from safetensors.torch import save_file
from comfyui_common import random_model

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
LORAS = tempfile.mkdtemp(prefix="lora-engine-flux-smoke-")
folder_paths.add_model_folder_path("loras", LORAS, is_default=True)
CPU = torch.device("cpu")

cfg = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 64,
       "context_in_dim": 64, "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
       "depth_single_blocks": 2, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True}
m, mp = random_model(comfy.supported_models.Flux(cfg))
msd = mp.model_state_dict()
print("model:", type(m.diffusion_model).__name__, len(msd), "keys, e.g.",
      [k for k in msd if "double_blocks.0.img_attn.qkv" in k][:1], tuple(msd["diffusion_model.single_blocks.0.linear1.weight"].shape))

tiny = {"clip_l_model_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                "num_hidden_layers": 2, "projection_dim": 32},
        "t5xxl_model_config": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2}}
clip = comfy.sd.CLIP(ClipTarget(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip()),
                     model_options=tiny)
with torch.no_grad():
    for p in clip.cond_stage_model.parameters():
        p.copy_(torch.randn_like(p) * 0.1)
csd = clip.patcher.model_state_dict()
print("clip:", sorted({k.split(".")[0] for k in csd}), "dtype", next(iter(csd.values())).dtype)

# ---- LoRA files -------------------------------------------------------------------------------------------------
g = torch.Generator().manual_seed(1)


def pair(sd, name, o, i, r=4, alpha=None, down="lora_down", up="lora_up"):
    sd[f"{name}.{down}.weight"] = torch.randn(r, i, generator=g) * 0.1
    sd[f"{name}.{up}.weight"] = torch.randn(o, r, generator=g) * 0.1
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(alpha)


unet2d = [k[len("diffusion_model."):-len(".weight")] for k, v in msd.items() if k.endswith(".weight") and v.ndim == 2]
kohya, native = {}, {}
for x in unet2d:
    o, i = msd[f"diffusion_model.{x}.weight"].shape
    pair(kohya, "lora_unet_" + x.replace(".", "_"), o, i, alpha=2.0)
    pair(native, "diffusion_model." + x, o, i, alpha=8.0, r=8)
for k, v in csd.items():
    if k.endswith(".weight") and v.ndim == 2 and ("encoder.layers." in k or "encoder.block." in k):
        rel = k.split(".transformer.", 1)[1][:-len(".weight")].replace(".", "_")
        pair(kohya, ("lora_te1_" if k.startswith("clip_l.") else "lora_te2_") + rel, v.shape[0], v.shape[1], alpha=2.0)
to_native = comfy.utils.flux_to_diffusers({"depth": cfg["depth"], "depth_single_blocks": cfg["depth_single_blocks"],
                                           "hidden_size": cfg["hidden_size"]}, output_prefix="diffusion_model.")
diffusers = {}
for dkey, target in to_native.items():
    if dkey.endswith(".weight") and any(s in dkey for s in (".to_q.", ".to_k.", ".to_v.", "proj_mlp", "add_q_proj",
                                                             "norm_out.linear", ".ff.net.2.")):
        key = target[0] if isinstance(target, tuple) else target
        rows = target[1][2] if isinstance(target, tuple) and target[1] is not None else msd[key].shape[0]
        pair(diffusers, "transformer." + dkey[:-len(".weight")], rows, msd[key].shape[1], down="lora_A", up="lora_B")
files = {"kohya": kohya, "native": native, "diffusers": diffusers}
for name, sd in files.items():
    save_file(sd, os.path.join(LORAS, f"flux_{name}.safetensors"))

ok = asyncio.run(nodes.load_custom_node(PACK))
N = nodes.NODE_CLASS_MAPPINGS
assert ok and "LoraEngineLoader" in N
import lora_engine.engine
print("lora_engine from", os.path.dirname(os.path.dirname(lora_engine.engine.__file__)))


def state(p):
    """The weights a run of ``p`` uses, loaded the way ComfyUI loads a model for a run (the CLIP object is
    loaded at creation: patching a clone by hand would find its modules marked as already patched)."""
    comfy.model_management.load_models_gpu([p], force_full_load=True)
    return {k: v.detach().clone() for k, v in p.model_state_dict().items()}


def worst(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


for name, sd in files.items():
    fname = f"flux_{name}.safetensors"
    for sm, sc in ((1.0, 1.0), (-0.7, 0.6)):
        ours_m, ours_c = N["LoraEngineLoader"]().load(mp, clip, fname, sm, sc)
        theirs_m, theirs_c = nodes.LoraLoader().load_lora(mp, clip, fname, sm, sc)
        om, tm = state(ours_m), state(theirs_m)
        changed = sum(not torch.equal(om[k], msd[k]) for k in om)
        d_m = worst(om, tm)
        line = f"{name:9s} s={sm:+.1f}/{sc:+.1f}: model {changed} weights changed (ComfyUI patched {len(theirs_m.patches)}), " \
               f"vs ComfyUI LoraLoader max|d|={d_m:.3g}"
        if name == "kohya":
            oc, tc = state(ours_c.patcher), state(theirs_c.patcher)
            d_c = worst(oc, tc)
            line += f"; clip {len(ours_c.patcher.patches)} patched (ComfyUI {len(theirs_c.patcher.patches)}), max|d|={d_c:.3g}"
            bad = sorted(k for k in oc if (oc[k].double() - tc[k].double()).abs().max() > 1e-6)
            print(line, "| clip keys differing:", len(bad), bad[:3])
            assert len(ours_c.patcher.patches) == len(theirs_c.patcher.patches) > 0 and d_c <= 1e-6
        else:
            print(line)
        assert changed == len(theirs_m.patches) > 0 and d_m <= 1e-6, (name, d_m)
state(mp), state(clip.patcher)
assert all(torch.equal(v, msd[k]) for k, v in mp.model_state_dict().items())
assert all(torch.equal(v, csd[k]) for k, v in clip.patcher.model_state_dict().items())
print("restored bit-exact: True")

# ---- on the fly: output = merged, a strength change loaded by ComfyUI writes no weight ----------------------------
x = torch.randn(1, 16, 8, 8, generator=g)
ctx, y = torch.randn(1, 4, 64, generator=g), torch.randn(1, 64, generator=g)
t, guidance = torch.tensor([0.5]), torch.tensor([3.5])


def run(p):
    comfy.model_management.load_models_gpu([p])
    with torch.no_grad():
        return p.model.diffusion_model(x, t, ctx, y=y, guidance=guidance).clone()


def params():
    return {k: (id(v), v._version) for k, v in m.named_parameters()}


plain = run(mp)
for sm in (0.8, -1.3):
    (fly,) = N["LoraEngineLoaderModelOnly"]().load(mp, "flux_kohya.safetensors", sm, "", "on the fly")
    (merged,) = N["LoraEngineLoaderModelOnly"]().load(mp, "flux_kohya.safetensors", sm)
    want = run(merged)
    run(mp)
    before = params()
    got = run(fly)
    same = params() == before
    print(f"on the fly s={sm:+.1f}: weight patches {len(fly.patches)}, injections {list(fly.injections)}; "
          f"output vs merged max|d|={(got - want).abs().max().item():.3g} (vs no LoRA {(want - plain).abs().max().item():.3g}); "
          f"weights untouched: {same}")
    assert not fly.patches and same and torch.allclose(got, want, atol=1e-4, rtol=1e-4) and (want - plain).abs().max() > 1e-3
(f1,) = N["LoraEngineLoaderModelOnly"]().load(mp, "flux_kohya.safetensors", 0.5, "", "on the fly")
run(f1)
before = params()
runner = next(v for k, v in sys.modules.items() if k.endswith("comfy_nodes.onthefly")).runner_for(m)
built = {(p, k): v[0] for p, h in runner.hooks.items() for k, v in h.fused_cache.items()}
(f2,) = N["LoraEngineLoaderModelOnly"]().load(mp, "flux_kohya.safetensors", 1.1, "", "on the fly")
got = run(f2)
untouched = params() == before
kept = len(built) > 0 and all(runner.hooks[p].fused_cache[k][0] is v for (p, k), v in built.items())
(merged,) = N["LoraEngineLoaderModelOnly"]().load(mp, "flux_kohya.safetensors", 1.1)
want = run(merged)
print(f"strength change 0.5 -> 1.1 on the fly through load_models_gpu: weights untouched {untouched}; "
      f"{len(built)} side paths kept: {kept}; output vs merged max|d|={(got - want).abs().max().item():.3g}")
assert untouched and kept
assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
assert torch.equal(run(mp), plain)
# the CLIP (CLIP-L + T5) on the fly: CONDITIONING = merged, CLIP weights untouched
_, clip_fly = N["LoraEngineLoader"]().load(mp, clip, "flux_kohya.safetensors", 0.0001, 0.9, "", "on the fly")
_, clip_merged = N["LoraEngineLoader"]().load(mp, clip, "flux_kohya.safetensors", 0.0001, 0.9)
(c_merged,) = nodes.CLIPTextEncode().encode(clip_merged, "a photo of a cat")
(c_plain,) = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")
(c_fly,) = nodes.CLIPTextEncode().encode(clip_fly, "a photo of a cat")
d_fly = (c_fly[0][0] - c_merged[0][0]).abs().max().item()
print(f"CLIP on the fly: weight patches {len(clip_fly.patcher.patches)}; CONDITIONING vs merged max|d|={d_fly:.3g} "
      f"(vs no LoRA {(c_merged[0][0] - c_plain[0][0]).abs().max().item():.3g})")
assert not clip_fly.patcher.patches and d_fly <= 3e-4 and (c_merged[0][0] - c_plain[0][0]).abs().max() > 1e-3
state(clip.patcher)
assert all(torch.equal(v, csd[k]) for k, v in clip.patcher.model_state_dict().items())
print("ALL CHECKS PASSED")
