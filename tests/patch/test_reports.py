"""What the engine tells the user after applying: unmatched keys with a diagnosis, dropped bias deltas."""
import pytest
import torch
from safetensors.torch import save_file

from lora_engine.library.parsed import LoraCache
from lora_engine.engine import LoraEngine, Mode
from lora_engine.patch import StackEntry
from tests.patch.conftest import make_host
from tests.fixtures.files.kohya import write_kohya


@pytest.mark.parametrize("mode", [Mode.MERGED, Mode.ONTHEFLY])
def test_sdxl_lora_on_sd1_applies_nothing_unless_forced(tmp_path, mode):
    _, _, km_xl = make_host("sdxl", "a1111")
    _, root, km = make_host("sd1", "a1111")
    write_kohya(tmp_path / "xl.safetensors", km_xl, seed=3, fraction=1.0)
    before = {k: v.clone() for k, v in root.state_dict().items()}
    xl = LoraCache().get(tmp_path / "xl.safetensors")
    eng = LoraEngine(root, km, mode)
    plan = eng.set_stack([StackEntry(xl)])
    (line,) = eng.warnings()
    assert line.startswith("xl: ") and "SDXL LoRA on an SD1.x model" in line and "nothing of it was applied" in line
    fitting = plan.reports[xl.path].touched
    assert fitting > 0 and f"applies the {fitting} module(s) that fit" in line  # names and shapes that happen to fit
    assert not plan.contributions and all(torch.equal(v, before[k]) for k, v in root.state_dict().items())
    assert not getattr(eng._patcher, "hooks", None)
    forced = LoraEngine(root, km, mode, force_foreign=True)
    plan = forced.set_stack([StackEntry(xl)])
    (line,) = forced.warnings()
    assert "SDXL LoRA on an SD1.x model" in line and "nothing of it was applied" not in line
    assert len({plan.targets[s].weight_key for s in plan.contributions}) == fitting
    if mode is Mode.MERGED:
        changed = [k for k, v in root.state_dict().items() if not torch.equal(v, before[k])]
        assert len(changed) == fitting
    forced.restore()
    assert all(torch.equal(v, before[k]) for k, v in root.state_dict().items())


def test_bias_delta_on_biasless_layer_is_reported(tmp_path):
    m, root, km = make_host("sd1", "diffusers")
    to_q = m.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert to_q.bias is None
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    o, i = to_q.weight.shape
    save_file({f"{base}.lora_A.weight": torch.randn(2, i), f"{base}.lora_B.weight": torch.randn(o, 2),
               f"{base}.lora_B.bias": torch.randn(o)}, str(tmp_path / "b.safetensors"))
    eng = LoraEngine(root, km)
    eng.set_stack([StackEntry(LoraCache().get(tmp_path / "b.safetensors"))])
    lines = eng.warnings()
    assert len(lines) == 1 and "no bias" in lines[0], lines


def test_sd1_lora_on_sd2_names_match_but_shapes_do_not(tmp_path):
    _, _, km1 = make_host("sd1", "diffusers")
    _, root, km2 = make_host("sd2", "diffusers")
    write_kohya(tmp_path / "sd1.safetensors", km1, seed=4, fraction=1.0, component="unet")
    before = {k: v.clone() for k, v in root.state_dict().items()}
    eng = LoraEngine(root, km2)
    eng.set_stack([StackEntry(LoraCache().get(tmp_path / "sd1.safetensors"))])
    lines = eng.warnings()
    assert len(lines) == 1 and "another shape" in lines[0], lines
    # whatever did fit was applied; nothing raised; restore gives the base back
    eng.restore()
    assert all(torch.equal(v, before[k]) for k, v in root.state_dict().items())
