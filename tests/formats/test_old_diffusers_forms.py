"""The oldest diffusers key forms, which no current code writes: the attention-processor form
(``…attn1.processor.to_q_lora.down.weight``, from ``unet.save_attn_procs``; text encoder
``…self_attn.to_q_lora.down.weight``) and the ``lora.down`` / ``lora_linear_layer`` forms.

Hand-built: the same random tensors are written in kohya form and in each old form. The old files carry
no α (α = r). Checks: identical module names and bit-identical ΔW (same tensors, same math, so exact
equality is the right tolerance); and the module each old key lands on is the one diffusers' own
old→PEFT key converters (``convert_unet_state_dict_to_peft``, ``convert_state_dict_to_peft``) name.
"""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from lora_engine.formats import load_lora
from tests.fixtures.models.oracle import tiny_clip, tiny_unet

PROJ_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
PROJ_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _targets():
    """(component, attention module path, old projection name, target path, (out, in)) from the real models."""
    out = []
    for comp, model, table in (("unet", tiny_unet(), PROJ_UNET), ("text_encoder", tiny_clip(), PROJ_TE)):
        mods = dict(model.named_modules())
        for name, mod in mods.items():
            if not name.endswith(("attn1", "attn2", "self_attn")):
                continue
            if comp == "text_encoder" and name.startswith("encoder."):
                name = "text_model." + name  # transformers 5 dropped this level; the old files have it
            for old, new in table.items():
                lin = mods[(name.removeprefix("text_model.") if comp == "text_encoder" else name) + "." + new]
                out.append((comp, name, old, f"{name}.{new}", tuple(lin.weight.shape)))
    return out


def _files(tmp_path):
    g = torch.Generator().manual_seed(3)
    kohya, proc_unet, proc_te, lora_dot = {}, {}, {}, {}
    for comp, attn, old, target, (o, i) in _targets():
        down, up = torch.randn(4, i, generator=g), torch.randn(o, 4, generator=g)
        prefix = "lora_unet_" if comp == "unet" else "lora_te_"
        kname = prefix + target.replace(".", "_")
        kohya[f"{kname}.lora_down.weight"], kohya[f"{kname}.lora_up.weight"] = down, up
        if comp == "unet":
            proc_unet[f"{attn}.processor.{old}_lora.down.weight"] = down
            proc_unet[f"{attn}.processor.{old}_lora.up.weight"] = up
            lora_dot[f"unet.{target}.lora.down.weight"], lora_dot[f"unet.{target}.lora.up.weight"] = down, up
        else:
            proc_te[f"text_encoder.{attn}.{old}_lora.down.weight"] = down
            proc_te[f"text_encoder.{attn}.{old}_lora.up.weight"] = up
            lora_dot[f"text_encoder.{target}.lora_linear_layer.down.weight"] = down
            lora_dot[f"text_encoder.{target}.lora_linear_layer.up.weight"] = up
    paths = {}
    for name, sd in (("kohya", kohya), ("proc_unet", proc_unet), ("proc_te", proc_te), ("lora_dot", lora_dot),
                     ("proc_both", {**proc_unet, **proc_te})):
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(sd, str(paths[name]))
    return paths, proc_unet, proc_te


def _same_as_kohya(lf, ref, prefix: str | None = None) -> None:
    assert not lf.problems and not lf.unknown_keys, (lf.problems, lf.unknown_keys[:5])
    want = {n for n in ref.modules if prefix is None or n.startswith(prefix)}
    assert set(lf.modules) == want and want
    for n in want:
        assert lf.modules[n].adapter.scale == ref.modules[n].adapter.scale == 1.0
        w = torch.zeros(ref.modules[n].adapter.natural_shape())
        assert torch.equal(lf.modules[n].adapter.delta(w).weight, ref.modules[n].adapter.delta(w).weight), n


def test_old_forms_equal_kohya(tmp_path):
    paths, _, _ = _files(tmp_path)
    ref = load_lora(paths["kohya"])
    _same_as_kohya(load_lora(paths["proc_unet"]), ref, "lora_unet_")
    _same_as_kohya(load_lora(paths["proc_te"]), ref, "lora_te_")
    _same_as_kohya(load_lora(paths["proc_both"]), ref)
    lf = load_lora(paths["lora_dot"])
    _same_as_kohya(lf, ref)
    assert load_lora(paths["proc_unet"]).format == "diffusers-old"


def test_old_forms_land_where_diffusers_converter_says(tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    paths, proc_unet, proc_te = _files(tmp_path)
    for path, sd, convert, strip in ((paths["proc_unet"], proc_unet, convert_unet_state_dict_to_peft, ""),
                                     (paths["proc_te"], proc_te, convert_state_dict_to_peft, "text_encoder.")):
        theirs = {k.removesuffix(".lora_A.weight").replace(".processor", "").removeprefix(strip)
                  for k in convert(sd) if k.endswith(".lora_A.weight")}
        ours = {m.dotted for m in load_lora(path).modules.values()}
        assert ours == theirs and len(ours) >= 8
