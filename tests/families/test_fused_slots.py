"""Split LoRAs (``to_q``/``to_k``/``to_v``/``proj_mlp``, written by peft + diffusers) on the fused weights of
the native Flux tree (``qkv``, ``linear1``) in bf16: merged mode keeps one slot per fused weight (one backup,
one write, one fp32 sum and one rounding per element), checked bit for bit against an independent fp64 sum
rounded once; restore is bit-exact; a strength change rewrites only the weights that LoRA touches; on the fly
runs them as one low-rank side path of the fused layer."""
from __future__ import annotations

import pytest
import torch

from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from tests.fixtures.files.flux import native_lora, peft_file, write
from tests.fixtures.models.flux import NativeTree, flux_model, native_state

pytest.importorskip("diffusers")
pytest.importorskip("peft")

SPLIT = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "proj_mlp"]
GRID = 16  # LoRA factors on a 1/16 grid, α/r and strengths powers of two (or 3/4): every fp32 product is exact


@pytest.fixture(scope="module")
def tree():
    d = flux_model(seed=5)
    native = NativeTree(native_state(d)).to(torch.bfloat16)
    return d, native


def _files(d, nshapes, tmp_path):
    """A: peft split LoRA on q/k/v (+ the txt side and proj_mlp); B: a kohya LoRA on the whole img qkv and on
    img_mlp.0 (overlaps A on the fused qkv)."""
    peft_file(d, tmp_path, seed=21, r=4, alpha=8, targets=SPLIT, grid=GRID)
    a = str(tmp_path / "pytorch_lora_weights.safetensors")
    t = native_lora(nshapes, 22, ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0"], r=4, alpha=2.0)
    t = {k: (v if k.endswith(".alpha") else torch.round(v * GRID * 4) / GRID) for k, v in t.items()}
    b = write(t, tmp_path / "kohya.safetensors")
    return load_lora(a), load_lora(b), t


def _independent(before, d, kohya, wa: float, wb: float) -> dict[str, torch.Tensor]:
    """fp64: W₀ + wa·2·B·A at each split layer's rows of the fused weight (offsets from the config: q = k = v
    = heads·head_dim, mlp after them) + wb·½·up·down on the kohya modules; rounded once to bf16."""
    from safetensors.torch import load_file

    cfg = d.config
    h = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = d.single_transformer_blocks[0].proj_mlp.out_features
    where = {"transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", 0, h),
             "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", h, 2 * h),
             "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv", 2 * h, 3 * h),
             "transformer_blocks.0.attn.add_q_proj": ("double_blocks.0.txt_attn.qkv", 0, h),
             "transformer_blocks.0.attn.add_k_proj": ("double_blocks.0.txt_attn.qkv", h, 2 * h),
             "transformer_blocks.0.attn.add_v_proj": ("double_blocks.0.txt_attn.qkv", 2 * h, 3 * h),
             "single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1", 0, h),
             "single_transformer_blocks.0.attn.to_k": ("single_blocks.0.linear1", h, 2 * h),
             "single_transformer_blocks.0.attn.to_v": ("single_blocks.0.linear1", 2 * h, 3 * h),
             "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", 3 * h, 3 * h + mlp)}
    out = {}
    sd = load_file(kohya_a_path(d))
    for module, (native, a, b) in where.items():
        key = native + ".weight"
        w = out.setdefault(key, before[key].double())
        A = sd[f"transformer.{module}.lora_A.weight"].double()
        B = sd[f"transformer.{module}.lora_B.weight"].double()
        w[a:b] += wa * (8 / 4) * (B @ A)
    for native in ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0"):
        key = native + ".weight"
        w = out.setdefault(key, before[key].double())
        k = "lora_unet_" + native.replace(".", "_")
        w += wb * (2.0 / 4) * (kohya[k + ".lora_up.weight"].double() @ kohya[k + ".lora_down.weight"].double())
    return {k: v.to(torch.bfloat16) for k, v in out.items()}


_A_PATH: dict[int, str] = {}


def kohya_a_path(d) -> str:
    return _A_PATH[id(d)]


def test_one_slot_per_fused_weight_bit_exact(tree, tmp_path):
    d, n = tree
    nshapes = shapes_of(n)
    a, b, kohya = _files(d, nshapes, tmp_path)
    _A_PATH[id(d)] = a.path
    before = {k: v.clone() for k, v in n.state_dict().items()}
    e = LoraEngine(n, build_keymap(nshapes), mode="merged")
    plan = e.set_stack([StackEntry(a, unet=0.75), StackEntry(b, unet=-0.5)])
    assert not e.warnings(), e.warnings()
    fused = {"double_blocks.0.img_attn.qkv.weight": 4, "double_blocks.0.txt_attn.qkv.weight": 3,
             "single_blocks.0.linear1.weight": 4}
    # one slot per weight touched (3 fused + img_mlp.0), each fused one holding all its slices (a slot
    # spans the rows its LoRAs cover: here every row of each fused weight)
    slots = {plan.targets[s].weight_key: s for s in plan.contributions}
    assert len(slots) == len(plan.contributions) == 4
    assert sorted(slots) == sorted([*fused, "double_blocks.0.img_mlp.0.weight"])
    for key, count in fused.items():
        assert len(plan.contributions[slots[key]]) == count, key
        assert plan.targets[slots[key]].shape == tuple(n.get_parameter(key).shape), key
    assert len(e._patcher.backups) == 4 and e.stats.slots_written == 4
    want = _independent(before, d, kohya, 0.75, -0.5)
    state = n.state_dict()
    for key, w in want.items():
        assert torch.equal(state[key].view(torch.int16), w.view(torch.int16)), key
        assert not torch.equal(state[key], before[key]), key
    for key in state:
        if key not in want:
            assert torch.equal(state[key], before[key]), key

    # a strength change of B rewrites only B's two weights (img qkv shared with A, img_mlp.0): the fused
    # weight once, with all its slices; A's placed adapters are kept, not padded again
    lin1 = {c.module_name: c.adapter for c in plan.contributions[slots["single_blocks.0.linear1.weight"]]}
    e.set_stack([StackEntry(a, unet=0.75), StackEntry(b, unet=0.25)])
    again = e.plan.contributions[slots["single_blocks.0.linear1.weight"]]
    assert all(c.adapter is lin1[c.module_name] for c in again)
    assert e.stats.slots_written == 2
    assert e.stats.bytes_written == 2 * (n.get_parameter("double_blocks.0.img_attn.qkv.weight").numel()
                                         + n.get_parameter("double_blocks.0.img_mlp.0.weight").numel())
    want = _independent(before, d, kohya, 0.75, 0.25)
    for key, w in want.items():
        assert torch.equal(n.state_dict()[key].view(torch.int16), w.view(torch.int16)), key
    # A's change: its three fused weights, one write each
    e.set_stack([StackEntry(a, unet=0.5), StackEntry(b, unet=0.25)])
    assert e.stats.slots_written == 3
    e.set_stack([StackEntry(b, unet=0.25)])  # A leaves: txt qkv and linear1 restored, img qkv rewritten
    assert sorted(e.plan.targets[s].weight_key for s in e.plan.contributions) == \
        ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mlp.0.weight"]
    for key in ("double_blocks.0.txt_attn.qkv.weight", "single_blocks.0.linear1.weight"):
        assert torch.equal(n.state_dict()[key], before[key]), key
    e.restore()
    assert all(torch.equal(before[k], v) for k, v in n.state_dict().items()), "restore is not bit-exact"


def test_disjoint_slices_leave_other_rows_bit_for_bit(tree, tmp_path):
    """q and v only on a fused qkv: one slot over rows [0, 3h), and k's rows keep their bits (−0.0 too)."""
    d, n = tree
    nshapes = shapes_of(n)
    peft_file(d, tmp_path, seed=23, targets=["to_q", "to_v"], grid=GRID)
    lf = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    key = "double_blocks.0.img_attn.qkv.weight"
    h = d.config.num_attention_heads * d.config.attention_head_dim
    with torch.no_grad():
        n.get_parameter(key)[h:h + 2] = -0.0
    before = {k: v.clone() for k, v in n.state_dict().items()}
    e = LoraEngine(n, build_keymap(nshapes), mode="merged")
    e.set_stack([StackEntry(lf)])
    assert f"{key}[0:{3 * h}]" in e.plan.contributions and len(e._patcher.backups) == 2
    w = n.state_dict()[key]
    assert torch.equal(w[h:2 * h].view(torch.int16), before[key][h:2 * h].view(torch.int16))
    assert not torch.equal(w[:h], before[key][:h]) and not torch.equal(w[2 * h:], before[key][2 * h:])
    e.restore()
    assert all(torch.equal(before[k].view(torch.int16), v.view(torch.int16)) for k, v in n.state_dict().items())


def test_onthefly_split_lora_is_one_side_path(tree, tmp_path):
    """On the fly, q/k/v/mlp LoRAs on ``linear1`` are one low-rank side path (row-placed up factors, no
    dense ΔW), equal to merged (fp32 tree) and to an independent fp64 side path."""
    d, _ = tree
    n = NativeTree(native_state(d))
    nshapes = shapes_of(n)
    peft_file(d, tmp_path, seed=24, targets=SPLIT)
    lf = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    path = "single_blocks.0.linear1"
    lin = n.get_submodule(path)
    x = torch.randn(2, 5, lin.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = lin(x)
        e = LoraEngine(n, build_keymap(nshapes), mode="onthefly")
        e.set_stack([StackEntry(lf, unet=0.5)])
        fly = lin(x)
        hook = e._patcher.hooks[path]
        fused, rest = hook._fused_for(x)
        assert fused is not None and rest == [] and len(fused.lora_ids) == 4
        assert not any(t.cache for ts in hook.terms.values() for t in ts), "a dense delta was built"
        e.restore()
        m = LoraEngine(n, build_keymap(nshapes), mode="merged")
        m.set_stack([StackEntry(lf, unet=0.5)])
        merged = lin(x)
        m.restore()
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    cfg = d.config
    hq = cfg.num_attention_heads * cfg.attention_head_dim
    ups, downs = [], []
    for mod in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
        downs.append(sd[f"transformer.single_transformer_blocks.0.{mod}.lora_A.weight"].double())
        ups.append(sd[f"transformer.single_transformer_blocks.0.{mod}.lora_B.weight"].double())
    side = torch.cat([(x.double() @ dn.T) @ up.T for dn, up in zip(downs, ups)], -1) * (0.5 * 8 / 4)
    assert side.shape[-1] == lin.out_features and ups[0].shape[0] == hq
    assert torch.allclose(fly.double(), base.double() + side, atol=1e-5)
    assert torch.allclose(fly, merged, atol=1e-5)
