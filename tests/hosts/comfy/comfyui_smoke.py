"""Check the pack inside a real ComfyUI (CPU, tiny random SD1-layout UNet and CLIP-L; no weights downloaded).

    cd /path/to/ComfyUI && python /path/to/lora-engine/tests/hosts/comfy/comfyui_smoke.py /path/to/lora-engine

Imports ComfyUI's own modules, loads the pack with ``nodes.load_custom_node`` (as ComfyUI does at start-up),
writes LoRA files to a temporary folder registered with ``folder_paths.add_model_folder_path("loras", ...)``,
and compares the weights ComfyUI runs with against ComfyUI's own LoraLoader and lora-engine's engine.
Prints one line per check and exits non-zero on a failed check. Run by ``test_real_comfyui.py`` when
``LORA_ENGINE_COMFYUI`` is set. (ComfyUI imports torchvision at import time: have it installed, or a stub on
PYTHONPATH for this CPU check.)
"""
import asyncio, copy, logging, os, sys, tempfile
sys.path.insert(0, os.getcwd())
PACK = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join("custom_nodes", "lora-engine"))
from comfy.cli_args import args
args.cpu = True
import torch
import comfy.hooks, comfy.model_management, comfy.model_patcher, comfy.sd, comfy.supported_models, comfy.utils
import folder_paths, nodes
from safetensors.torch import save_file, load_file
from comfyui_common import random_model

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
LORAS = tempfile.mkdtemp(prefix="lora-engine-smoke-")
folder_paths.add_model_folder_path("loras", LORAS, is_default=True)

# ComfyUI's SD15 UNet config at toy size (32 channels: its GroupNorm has 32 groups).
cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
       "legacy": False, "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 32,
       "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
       "use_linear_in_transformer": False, "context_dim": 32, "num_heads": 2,
       "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False}
m, mp = random_model(comfy.supported_models.SD15(cfg))
print("model keys", len(mp.model_state_dict()))

# ---- LoRA files (kohya names of ComfyUI's own ldm layout) in the registered loras folder ----------------------
g = torch.Generator().manual_seed(1)


def rnd(*shape):
    return torch.randn(*shape, generator=g) * 0.1


def dora_scale(w, axis):
    """A magnitude near the weight's norms: (out, 1, ...) for the output axis, (1, in, ...) for the input axis."""
    keep = [1] * w.ndim
    keep[axis] = w.shape[axis]
    norm = w.detach().transpose(0, axis).reshape(w.shape[axis], -1).norm(dim=1).reshape(keep)
    return norm * (1 + rnd(*keep))


def module_tensors(kind, mod):
    w = mod.weight
    out, inn, ks = w.shape[0], w.shape[1], tuple(w.shape[2:])
    if kind in ("locon", "dora-out", "dora-in") or (kind == "lora" and isinstance(mod, torch.nn.Linear)):
        t = {"lora_down.weight": rnd(4, inn, *ks), "lora_up.weight": rnd(out, 4, *([1] * len(ks))),
             "alpha": torch.tensor(2.0)}
        if kind.startswith("dora"):
            t["dora_scale"] = dora_scale(w, 0 if kind == "dora-out" else 1)
        return t
    if kind == "loha":
        flat = w[0].numel()
        return {"hada_w1_a": rnd(out, 4), "hada_w1_b": rnd(4, flat), "hada_w2_a": rnd(out, 4),
                "hada_w2_b": rnd(4, flat), "alpha": torch.tensor(2.0)}
    if kind == "lokr" and out % 2 == 0 and inn % 2 == 0:
        return {"lokr_w1": rnd(2, 2), "lokr_w2": rnd(out // 2, inn // 2, *ks)}
    return {}


def write(kind):
    sd = {}
    for n, mod in m.diffusion_model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            for role, t in module_tensors(kind, mod).items():
                sd[f"lora_unet_{n.replace('.', '_')}.{role}"] = t
    name = f"smoke_{kind}.safetensors"
    save_file(sd, os.path.join(LORAS, name))
    return name, os.path.join(LORAS, name)


files = {k: write(k) for k in ("lora", "locon", "loha", "lokr", "dora-out", "dora-in")}
listed = [n for n in folder_paths.get_filename_list("loras") if n.startswith("smoke_")]
print("loras listed by folder_paths:", listed)
assert {f[0] for f in files.values()} <= set(listed)

# ---- the pack, imported the way ComfyUI imports custom_nodes folders ------------------------------------------
ok = asyncio.run(nodes.load_custom_node(PACK))
ours_ids = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("LoraEngine"))
print("load_custom_node:", ok, ours_ids)
assert ok and len(ours_ids) == 6
N = nodes.NODE_CLASS_MAPPINGS

def state(p):
    p.patch_model(device_to=torch.device("cpu"))
    try:
        return {k: v.detach().clone() for k, v in p.model_state_dict().items()}
    finally:
        p.unpatch_model(device_to=torch.device("cpu"))

base = {k: v.detach().clone() for k, v in mp.model_state_dict().items()}
from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.keymap import build_keymap
from lora_engine.formats import load_lora
from lora_engine.patch import StackEntry
ref_root = copy.deepcopy(m)
eng = LoraEngine(ref_root, build_keymap(shapes_of(ref_root)))
for kind, (name, path) in files.items():
    for s in (1.0, -0.7):
        (ours_mp,) = N["LoraEngineLoaderModelOnly"]().load(mp, name, s)
        assert not mp.patches, "upstream patcher modified"
        ours = state(ours_mp)
        comfy_mp, _ = comfy.sd.load_lora_for_models(mp, None, comfy.utils.load_torch_file(path, safe_load=True), s, 0)
        theirs = state(comfy_mp)
        eng.set_stack([StackEntry(load_lora(path), unet=s)])
        ref = {k: v.detach().clone() for k, v in ref_root.state_dict().items()}
        eng.restore()
        changed = [k for k in ours if not torch.equal(ours[k], base[k])]
        d_eng = max((ours[k] - ref[k]).abs().max().item() for k in ours)
        d_comfy = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        scale = max(theirs[k].abs().max().item() for k in changed)
        print(f"{kind:9s} s={s:+.1f}: {len(changed)} weights changed, ComfyUI patched {len(comfy_mp.patches)}; "
              f"vs engine max|d|={d_eng:.3g}; vs ComfyUI LoraLoader max|d|={d_comfy:.3g} (|W| max {scale:.3g})")
        assert d_eng == 0 and len(changed) == len(comfy_mp.patches) > 0
        assert d_comfy > 1e-3 if kind == "dora-out" else d_comfy <= 1e-6 * scale, (kind, d_comfy)
after = {k: v for k, v in mp.model_state_dict().items()}
restored = all(torch.equal(after[k], base[k]) for k in base)
print("restored bit-exact:", restored)
assert restored

# ---- chained lora-engine nodes join into one stack (order-independent, also for DoRA) --------------------------
(c1,) = N["LoraEngineLoaderModelOnly"]().load(mp, files["dora-out"][0], 0.6)
(c2,) = N["LoraEngineLoaderModelOnly"]().load(c1, files["loha"][0], -0.8)
eng.set_stack([StackEntry(load_lora(files["dora-out"][1]), unet=0.6), StackEntry(load_lora(files["loha"][1]), unet=-0.8)])
ref = {k: v.detach().clone() for k, v in ref_root.state_dict().items()}
eng.restore()
chained = state(c2)
d_chain = max((chained[k] - ref[k]).abs().max().item() for k in chained)
print(f"chained loaders (DoRA then LoHa) vs engine joint stack max|d|={d_chain}; entries per key:",
      sorted({len(v) for v in c2.patches.values()}))
assert d_chain == 0 and all(len(v) == 1 for v in c2.patches.values())

# ---- partial load (lowvram): ComfyUI computes the patched weight on the fly in each forward ----------------------
import comfy.ops
(lv,) = N["LoraEngineLoaderModelOnly"]().load(mp, files["locon"][0], -0.7)
merged_lv = state(lv)
lv.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
try:
    worst, seen = 0.0, 0
    for key in lv.patches:
        module = comfy.utils.get_attr(m, key.rsplit(".", 1)[0])
        if not getattr(module, "weight_function", None):
            continue
        w = comfy.ops.cast_bias_weight(module, input=torch.zeros(1, dtype=torch.float32))[0]
        worst, seen = max(worst, (w - merged_lv[key]).abs().max().item()), seen + 1
finally:
    lv.unpatch_model(device_to=torch.device("cpu"))
print(f"lowvram on-the-fly: {seen} weights computed in forward; max|d| vs merged = {worst:.3g}")
assert seen > 0 and worst <= 1e-6
assert all(torch.equal(mp.model_state_dict()[k], base[k]) for k in base)

# ---- scheduled strength through ComfyUI's hooks ------------------------------------------------------------------
(hooks,) = N["LoraEngineHookLora"]().create(mp, files["lora"][0], 0.8, 0.0, 0.0, 1.0)
hp = mp.clone()
hp.register_all_hook_patches(hooks, comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model))
hp.patch_hooks(hooks)
hooked = {k: v.detach().clone() for k, v in hp.model_state_dict().items()}
hp.unpatch_hooks()
(ours_mp,) = N["LoraEngineLoaderModelOnly"]().load(mp, files["lora"][0], 0.8)
merged = state(ours_mp)
d_hook = max((hooked[k] - merged[k]).abs().max().item() for k in merged)
print("hook (keyframe strength 1) vs loader merge max|d|:", d_hook)
assert d_hook == 0 and any(not torch.equal(hooked[k], base[k]) for k in base)
(hooks2,) = N["LoraEngineHookLora"]().create(mp, files["lora"][0], 0.8, 0.0, 0.5, 1.0)
kfs = hooks2.hooks[0].hook_keyframe.keyframes
print("keyframes (strength, start_percent):", [(k.strength, k.start_percent) for k in kfs])
assert [(k.strength, k.start_percent) for k in kfs] == [(0.0, 0.0), (1.0, 0.5)]
restored = all(torch.equal(mp.model_state_dict()[k], base[k]) for k in base)
print("after hooks restored:", restored)
assert restored

# ---- a real ComfyUI CLIP (tiny CLIP-L config), the prompt-tag node vs LoraLoader + CLIPTextEncode ----------------
import comfy.sd1_clip
from comfy.supported_models_base import ClipTarget
tiny = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 32}
clip = comfy.sd.CLIP(ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                     model_options={"clip_l_model_config": tiny})
with torch.no_grad():
    for p in clip.cond_stage_model.parameters():
        p.copy_(torch.randn_like(p) * 0.05)
csd = clip.patcher.model_state_dict()
print("clip keys e.g.", [k for k in csd if "layers.0.self_attn.q_proj" in k])
sd = load_file(files["lora"][1])
for k, v in csd.items():
    if k.endswith(("q_proj.weight", "v_proj.weight", "fc1.weight")):
        name = "lora_te_" + k[len("clip_l.transformer."):-len(".weight")].replace(".", "_")
        sd[name + ".lora_down.weight"] = rnd(4, v.shape[1]); sd[name + ".lora_up.weight"] = rnd(v.shape[0], 4)
        sd[name + ".alpha"] = torch.tensor(4.0)
save_file(sd, os.path.join(LORAS, "smoke_te.safetensors"))
text = "a photo of a cat <lora:smoke_te:0.8:0.5>, detailed"
m2, c2, cond, cleaned = N["LoraEnginePromptTags"]().apply(mp, clip, text)
print("cleaned text:", repr(cleaned), "| upstream untouched:", not mp.patches and not clip.patcher.patches)
assert cleaned == "a photo of a cat , detailed" and not mp.patches and not clip.patcher.patches
lm, lc = nodes.LoraLoader().load_lora(mp, clip, "smoke_te.safetensors", 0.5, 0.8)
(ref_cond,) = nodes.CLIPTextEncode().encode(lc, cleaned)
d_clip = max((a - b).abs().max().item() for a, b in zip(state(c2.patcher).values(), state(lc.patcher).values()))
d_unet = max((a - b).abs().max().item() for a, b in zip(state(m2).values(), state(lm).values()))
print("clip patches ours/ComfyUI:", len(c2.patcher.patches), len(lc.patcher.patches), "| clip weights max|d|:", d_clip,
      "| unet max|d|:", d_unet)
d_cond = (cond[0][0] - ref_cond[0][0]).abs().max().item()
d_plain = (cond[0][0] - nodes.CLIPTextEncode().encode(clip, cleaned)[0][0][0]).abs().max().item()
print("CONDITIONING vs LoraLoader+CLIPTextEncode max|d|:", d_cond, "| vs no LoRA:", d_plain)
assert len(c2.patcher.patches) == len(lc.patcher.patches) > 0 and d_clip <= 1e-6 and d_unet <= 1e-6
assert d_cond <= 1e-5 and d_plain > 1e-4
# scheduled tag: UNet part rides on the conditioning as hooks
m3, c3, cond3, _ = N["LoraEnginePromptTags"]().apply(mp, clip, "a cat <lora:smoke_te:1:start=0.5>")
print("scheduled tag: model patched:", bool(m3.patches), "| clip patched:", bool(c3.patcher.patches),
      "| cond hooks:", type(cond3[0][1].get("hooks")).__name__,
      [(k.strength, k.start_percent) for k in cond3[0][1]["hooks"].hooks[0].hook_keyframe.keyframes])
assert not m3.patches and c3.patcher.patches and cond3[0][1]["hooks"] is not None

# ---- diffusers/PEFT attention keys: ComfyUI skips them (SD1.x), lora-engine applies them ----------------------
d2l = comfy.utils.unet_to_diffusers(cfg)
sd = {}
for dk, lk in d2l.items():
    if any(dk.endswith(f".{p}.weight") for p in ("to_q", "to_k", "to_v", "to_out.0")):
        w = m.diffusion_model.state_dict()[lk]
        base_k = "unet." + dk[:-len(".weight")]
        sd[base_k + ".lora_A.weight"] = rnd(4, w.shape[1]); sd[base_k + ".lora_B.weight"] = rnd(w.shape[0], 4)
save_file(sd, os.path.join(LORAS, "smoke_peft.safetensors"))
(ours_mp,) = N["LoraEngineLoaderModelOnly"]().load(mp, "smoke_peft.safetensors", 1.0)
logging.getLogger().setLevel(logging.ERROR)
comfy_mp, _ = comfy.sd.load_lora_for_models(mp, None, load_file(os.path.join(LORAS, "smoke_peft.safetensors")), 1.0, 0)
print(f"diffusers/PEFT file: {len(sd) // 2} modules; lora-engine patched {len(ours_mp.patches)}, "
      f"ComfyUI LoraLoader patched {len(comfy_mp.patches)}")
assert len(ours_mp.patches) == len(sd) // 2 > 0
(info,) = N["LoraEngineInfo"]().info("smoke_te.safetensors", mp, clip)["result"]
print(info.splitlines()[1], "|", info.splitlines()[-1])
assert "86 of 86 modules match" in info
import shutil
shutil.rmtree(LORAS, ignore_errors=True)
print("ALL CHECKS PASSED")
