"""Every LyCORIS algorithm, written by lycoris-lora 4.1.3 on a real UNet2DConditionModel, read by
lora-engine: our ΔW must reproduce what lycoris's own *forward* path does to each layer's output.

Tolerance: rtol 1e-4 / atol 1e-5 in fp32. Both sides compute in fp32 but contract in different
orders (and OFT's Cayley inverse is fp64 on our side, fp32 on theirs), so bitwise equality is not
expected; a wrong scale, axis or layout gives errors of order 1e-2 or more.
"""
from __future__ import annotations

import logging

import pytest
import torch

from lora_engine.formats import load_lora
from tests.fixtures.models.oracle import module_output, sample_input, tiny_unet

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

CASES = {
    "locon": dict(algo="lora"),
    "locon-tucker": dict(algo="lora", use_tucker=True),
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=4),
    "lokr-decomposed": dict(algo="lokr", factor=4, decompose_both=True),
    "lokr-full": dict(algo="lokr", factor=4, full_matrix=True),
    "ia3": dict(algo="ia3"),
    "glora": dict(algo="glora"),
    "full": dict(algo="full"),
    "diag-oft": dict(algo="diag-oft", block_size=4, constraint=1e-3),
    "diag-oft-rescaled": dict(algo="diag-oft", block_size=4, rescaled=True),
    "boft": dict(algo="boft", block_size=4),
    "dora-out": dict(algo="lora", dora_wd=True, wd_on_output=True),
    "dora-in": dict(algo="lora", dora_wd=True, wd_on_output=False),
    "loha-dora": dict(algo="loha", dora_wd=True),
    "lokr-dora": dict(algo="lokr", factor=4, dora_wd=True),
}


def _lycoris_file(tmp_path, case: str):
    """Write a file with lycoris's own writer, fill every trainable tensor with random values (its
    initialisers zero one factor), then load it back through lycoris's own loader and apply it."""
    from lycoris import create_lycoris
    from safetensors.torch import load_file, save_file

    kw = dict(CASES[case])
    algo = kw.pop("algo")
    def make():
        return create_lycoris(tiny_unet(seed=0), 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=1.0,
                              algo=algo, **kw)

    net = make()
    base = {l.lora_name: (l.org_module[0].weight.detach().clone(),
                          None if l.org_module[0].bias is None else l.org_module[0].bias.detach().clone())
            for l in net.loras}
    net.apply_to()  # registers the modules: state_dict() is empty before
    first = tmp_path / f"{case}-init.safetensors"
    net.save_weights(str(first), torch.float32, {})
    g = torch.Generator().manual_seed(7)
    sd = {}
    for k, v in load_file(str(first)).items():
        if k.endswith((".alpha", ".on_input")):
            sd[k] = v
        else:
            sd[k] = torch.randn(v.shape, generator=g) * 0.2 + (1.0 if k.endswith(".rescale") else 0.0)
    path = tmp_path / f"{case}.safetensors"
    save_file(sd, str(path))
    net.load_state_dict(load_file(str(path)))  # lycoris's own modules now hold the random tensors
    return net, path, base


@pytest.mark.parametrize("case", sorted(CASES))
def test_lycoris_forward_matches(tmp_path, case):
    net, path, base = _lycoris_file(tmp_path, case)
    lf = load_lora(path)
    assert not lf.problems, lf.problems
    assert not lf.unknown_keys, lf.unknown_keys[:5]
    checked = nontrivial = 0
    for lm in net.loras:
        layer = lm.org_module[0]
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        name = "lora_unet_" + lm.lora_name[len("lycoris_"):]
        ma = lf.modules[name]
        x = sample_input(layer)
        with torch.no_grad():
            expected = layer(x)  # lycoris's patched forward
            w, b = base[lm.lora_name]
            d = ma.adapter.delta(w)
            if d.bias is not None:
                b = (torch.zeros(w.shape[0]) if b is None else b) + d.bias
            ours = module_output(layer, w + d.weight, x, b)
            nontrivial += bool((expected - module_output(layer, w, x, base[lm.lora_name][1])).abs().max() > 1e-3)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5, msg=f"{case} {name}")
        checked += 1
    assert checked >= 20 and nontrivial >= checked * 0.8, (checked, nontrivial)


def test_lycoris_merge_path_double_scale_is_not_ours(tmp_path):
    """lycoris-lora 4.1.3's merge path applies α/r twice for LoHa; its forward path is right.
    Our ΔW must equal the forward path, and must differ from the buggy merge by exactly the factor α/r."""
    net, path, base = _lycoris_file(tmp_path, "loha")
    lf = load_lora(path)
    lm = next(l for l in net.loras if isinstance(l.org_module[0], torch.nn.Linear))
    layer = lm.org_module[0]
    ours = lf.modules["lora_unet_" + lm.lora_name[len("lycoris_"):]].adapter.delta(base[lm.lora_name][0]).weight
    with torch.no_grad():
        buggy = lm.get_diff_weight(multiplier=1.0)[0].reshape(ours.shape)
    s = 2.0 / 4
    torch.testing.assert_close(buggy, ours * s, rtol=1e-4, atol=1e-6)
    assert (buggy - ours).abs().max() > 0.4 * ours.abs().max()  # the bug is a factor-2 error here
