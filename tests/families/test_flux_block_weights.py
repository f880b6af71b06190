"""lora-block-weight's Flux vectors (61 entries: CLIP, T5, IN, D00..D18, S00..S37, OUT, LBW's ``BLOCKIDFLUX``):
every layer of the full Flux.1-dev tree (both namings) falls in the block LBW gives it, and a vector that zeroes
one block removes exactly that block's deltas, merged and on the fly, on the native and the diffusers tree."""
from __future__ import annotations

import pytest
import torch

from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.families import BY_NAME
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from lora_engine.syntax.blocks import BLOCK_IDS_FLUX, BlockRatios, flux_block, lbw_ratios, parse_vector
from lora_engine.syntax.prompt import parse_prompt
from tests.fixtures.files.flux import flux_modules, native_lora, peft_file, write
from tests.fixtures.models.flux import NativeTree, flux_model, native_state

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def test_layout_is_lbws():
    assert len(BLOCK_IDS_FLUX) == 61 and BLOCK_IDS_FLUX[:4] == ("CLIP", "T5", "IN", "D00")
    assert BLOCK_IDS_FLUX[21:23] == ("D18", "S00") and BLOCK_IDS_FLUX[-2:] == ("S37", "OUT")
    spec = parse_vector(",".join(str(i) for i in range(61)))
    assert spec.length == 61 and dict(zip(spec.ids, spec.resolve()))["S00"] == 22.0
    assert lbw_ratios("FLUXALL").ratios == (1.0,) * 61
    with pytest.raises(ValueError, match="61"):
        parse_vector(",".join(["1"] * 60))


def test_every_flux_dev_layer_has_its_block():
    """Flux.1-dev's declaration (19 double, 38 single blocks): native and diffusers names of each layer name the
    same LBW block, D/S by block index, the embedders IN, the final layer OUT."""
    flux = BY_NAME["flux"]
    cfg = {"heads": 24, "head_dim": 128, "kv_heads": 24, "inner": 3072, "mlp": 12288, "double": 19, "single": 38,
           "approximator": 0}
    seen = set()
    for layer in flux.layers(cfg):
        names = [layer.native] + [p.diffusers for p in layer.parts]
        blocks = {flux_block("lora_unet_" + n.replace(".", "_")) for n in names}
        assert len(blocks) == 1, (names, blocks)
        block = blocks.pop()
        if layer.native.startswith(("double_blocks.", "single_blocks.")):
            kind, index = layer.native.split(".")[:2]
            assert block == f"{kind[0].upper()}{int(index):02d}", layer.native
        else:
            assert block == ("OUT" if layer.native.startswith("final_layer") else "IN"), layer.native
        seen.add(block)
    assert seen == set(BLOCK_IDS_FLUX) - {"CLIP", "T5"}
    assert flux_block("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") == "CLIP"
    assert flux_block("lora_te3_encoder_block_0_layer_0_SelfAttention_q") == "T5"
    assert flux_block("lora_unet_input_blocks_4_1_proj_in") is None  # not a Flux module: ratio 1


@pytest.fixture(scope="module")
def models():
    d = flux_model(seed=13)
    return d, NativeTree(native_state(d))


def _vector(zero: str) -> str:
    return ",".join("0" if b == zero else "1" for b in BLOCK_IDS_FLUX)


def _block_weights(root, lf, ratios) -> dict[str, torch.Tensor]:
    e = LoraEngine(root, build_keymap(shapes_of(root)), mode="merged")
    e.set_stack([StackEntry(lf, unet=0.8, block_multiplier=ratios)])
    out = {k: v.clone() for k, v in root.state_dict().items()}
    e.restore()
    return out


def _in_block(key: str, block: str) -> bool:
    return flux_block("lora_unet_" + key.rpartition(".")[0].replace(".", "_")) == block


@pytest.mark.parametrize("block", ["D00", "S00", "IN"])
def test_zeroing_one_block_removes_exactly_its_deltas(models, tmp_path, block):
    d, n = models
    nshapes = shapes_of(n)
    kohya = write(native_lora(nshapes, 4, flux_modules(nshapes)), tmp_path / "k.safetensors")
    peft_file(d, tmp_path, seed=5)
    files = [load_lora(kohya), load_lora(tmp_path / "pytorch_lora_weights.safetensors")]
    # the tag syntax carries the vector to the stack entry
    parsed = parse_prompt(f"<lora:x:1:lbw={_vector(block)}>")
    assert parsed.warnings == (), parsed.warnings
    tag = parsed.tags[0]
    ratios = BlockRatios(tag.lbw.resolve())
    for root in (d, n):
        before = {k: v.clone() for k, v in root.state_dict().items()}
        for lf in files:
            full = _block_weights(root, lf, None)
            cut = _block_weights(root, lf, ratios)
            inside = [k for k in before if _in_block(k, block) and not torch.equal(full[k], before[k])]
            assert inside, f"the LoRA does not touch {block}"
            for k in before:
                if _in_block(k, block):
                    assert torch.equal(cut[k], before[k]), k
                else:
                    assert torch.equal(cut[k], full[k]), k
            _onthefly_check(root, lf, ratios, block)
        assert all(torch.equal(before[k], v) for k, v in root.state_dict().items())


def _onthefly_check(root, lf, ratios, block):
    linears = [p for p, m in root.named_modules() if isinstance(m, torch.nn.Linear)]
    g = torch.Generator().manual_seed(1)
    xs = {p: torch.randn(2, root.get_submodule(p).in_features, generator=g) for p in linears}
    km = build_keymap(shapes_of(root))
    with torch.no_grad():
        base = {p: root.get_submodule(p)(xs[p]) for p in linears}
        outs = []
        for r in (None, ratios):
            e = LoraEngine(root, km, mode="onthefly")
            e.set_stack([StackEntry(lf, unet=0.8, block_multiplier=r)])
            outs.append({p: root.get_submodule(p)(xs[p]) for p in linears})
            e.restore()
    full, cut = outs
    for p in linears:
        if flux_block("lora_unet_" + p.replace(".", "_")) == block:
            assert torch.equal(cut[p], base[p]), p
        else:
            assert torch.equal(cut[p], full[p]), p
