"""Merged weights after A1111's activate/deactivate sequence equal W + Σ m·ΔW (ΔW computed in the
test from the file's tensors), restore is bit-exact, checkpoint reloads drop stale backups."""
from __future__ import annotations


import torch
from safetensors.torch import save_file

from tests.hosts.a1111.conftest import make_network, module_of, write_lora
from tests.hosts.a1111.standin import Processing, activate, deactivate, parse_prompts
from tests.fixtures.models.tiny_sd import TinySD


def _originals(tiny, dotted_names):
    return {d: module_of(tiny, d).weight.detach().clone() for d in dotted_names}


def _run_activate(net, sd_model, prompt, negative=""):
    p = Processing(sd_model, [prompt], [negative], batch_size=1)
    p.prompts, p.negative_prompts = [prompt], [negative]
    p.prompts, data = parse_prompts(p.prompts)
    activate(p, data, {"lora": net}, {"lyco": net})
    return p, data


def test_merged_equals_sum_of_deltas_and_restores_bit_exact(sd_model, tiny, loras):
    folder, deltas = loras
    names = set(deltas["a"]) | set(deltas["b"])
    w0 = _originals(tiny, names)
    _, net = make_network(folder, lora_engine_mode="merged")
    p, data = _run_activate(net, sd_model, "a cat <lora:a:0.7> <lyco:b:-0.5:1.25>")
    for d in names:
        is_te = d.startswith("te.")
        want = w0[d].clone()
        want += (0.7 if True else 0) * deltas["a"].get(d, torch.zeros_like(want))
        want += (-0.5 if is_te else 1.25) * deltas["b"].get(d, torch.zeros_like(want))
        torch.testing.assert_close(module_of(tiny, d).weight, want, rtol=0, atol=1e-6, msg=d)
    assert p.comments == {}
    deactivate(p, data, {"lora": net}, {})
    _run_activate(net, sd_model, "no tags at all")  # A1111: activate(p, []) removes everything
    for d in names:
        assert torch.equal(module_of(tiny, d).weight, w0[d]), d


def test_unknown_name_warns_and_generation_continues(sd_model, tiny, loras):
    folder, deltas = loras
    w0 = _originals(tiny, deltas["a"])
    _, net = make_network(folder, lora_engine_mode="merged")
    p, _ = _run_activate(net, sd_model, "<lora:nope:1> <lora:a:1>")
    lines = [c for c in p.comments if "nope" in c]
    assert len(lines) == 1 and "not found" in lines[0], p.comments
    for d, dw in deltas["a"].items():
        torch.testing.assert_close(module_of(tiny, d).weight, w0[d] + dw, rtol=0, atol=1e-6)


def test_broken_file_and_unmatched_keys_warn(sd_model, tiny, loras, tmp_path):
    folder, _ = loras
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    other = TinySD.build("sd2")  # a LoRA for another architecture: its TE keys match nothing here
    write_lora(folder / "sd2lora.safetensors", other,
               {"lora_te_text_model_encoder_layers_2_self_attn_q_proj": "te.encoder.layers.2.self_attn.q_proj"}, 5)
    _, net = make_network(folder)
    p, _ = _run_activate(net, sd_model, "<lora:broken:1> <lora:sd2lora:1>")
    text = "\n".join(p.comments)
    assert "broken" in text and "sd2lora" in text and "matched nothing" in text, text


def test_checkpoint_reload_drops_old_backups(sd_model, tiny, loras):
    folder, deltas = loras
    c, net = make_network(folder, lora_engine_mode="merged")
    _run_activate(net, sd_model, "<lora:a:1>")
    # A1111 loads another checkpoint's weights into the same modules, then calls on_model_loaded
    new = TinySD.build("sd1", seed=3)
    with torch.no_grad():
        tiny.unet.load_state_dict(new.unet.state_dict())
        tiny.text_encoders[0].load_state_dict(new.text_encoders[0].state_dict())
    w_new = _originals(tiny, deltas["a"])
    c.model_loaded(sd_model)
    _run_activate(net, sd_model, "<lora:a:1>")
    for d, dw in deltas["a"].items():
        torch.testing.assert_close(module_of(tiny, d).weight, w_new[d] + dw, rtol=0, atol=1e-6)
    _run_activate(net, sd_model, "")
    for d in deltas["a"]:
        assert torch.equal(module_of(tiny, d).weight, w_new[d]), d


def test_lora_hashes_infotext_exact(sd_model, loras):
    import hashlib
    import struct

    folder, _ = loras

    def addnet(path):
        raw = path.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        return hashlib.sha256(raw[8 + n:]).hexdigest()[:12]

    _, net = make_network(folder)
    p, _ = _run_activate(net, sd_model, "<lora:a:1> x <lora:b:0.5>")
    ha, hb = addnet(folder / "a.safetensors"), addnet(folder / "b.safetensors")
    assert p.extra_generation_params["Lora hashes"] == f"a: {ha}, b: {hb}"


def test_handover_to_builtin(sd_model, tiny, loras):
    folder, deltas = loras
    w0 = _originals(tiny, deltas["a"])
    c, net = make_network(folder, lora_engine_mode="merged")
    _run_activate(net, sd_model, "<lora:a:1>")

    class Builtin:  # modules.extra_networks.ExtraNetwork("lora") of extensions-builtin/Lora
        calls = []

        def activate(self, p, params_list):
            self.calls.append([x.items for x in params_list])

        def deactivate(self, p):
            self.calls.append("deactivate")

    c.builtin = Builtin()
    c.opts.values["lora_engine_handover"] = True
    p, data = _run_activate(net, sd_model, "<lora:a:0.5>")
    assert Builtin.calls == [[["a", "0.5"]]]
    for d in deltas["a"]:
        assert torch.equal(module_of(tiny, d).weight, w0[d]), d  # ours restored before the built-in runs
    deactivate(p, data, {"lora": net}, {})
    assert Builtin.calls[-1] == "deactivate"


def test_release_builtin_restores_its_layers_first(sd_model, tiny, loras):
    from extension.builtin import release_builtin

    folder, deltas = loras
    layer = module_of(tiny, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    w0 = layer.weight.detach().clone()

    class Networks:  # the built-in's `networks` module: list + restore-from-backup
        loaded_networks = ["something"]

        @staticmethod
        def network_restore_weights_from_backup(m):
            m.weight.copy_(m.network_weights_backup)

    layer.network_weights_backup = w0.clone()
    layer.network_current_names = (("old", 1.0, 1.0, None),)
    with torch.no_grad():
        layer.weight.add_(1.0)  # the built-in's merged delta
    idle = module_of(tiny, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    idle.network_weights_backup, idle.network_current_names = idle.weight.detach().clone(), ()  # restored earlier
    assert release_builtin(sd_model, Networks) == 1
    assert torch.equal(layer.weight, w0) and Networks.loaded_networks == []
    # its backups are dropped (the built-in re-takes one from the now original weights when it merges again)
    assert layer.network_weights_backup is None and idle.network_weights_backup is None
    _, net = make_network(folder, lora_engine_mode="merged")
    _run_activate(net, sd_model, "<lora:a:1>")
    d = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    torch.testing.assert_close(layer.weight, w0 + deltas["a"][d], rtol=0, atol=1e-6)


def test_merged_mode_with_per_image_tags_uses_first_image_and_says_so(sd_model, tiny, loras):
    folder, deltas = loras
    w0 = _originals(tiny, set(deltas["a"]) | set(deltas["b"]))
    _, net = make_network(folder, lora_engine_mode="merged")
    p = Processing(sd_model, ["x <lora:a:1>", "y <lora:b:1>"], ["", ""], batch_size=2)
    p.prompts, p.negative_prompts = list(p.all_prompts), list(p.all_negative_prompts)
    p.prompts, data = parse_prompts(p.prompts)
    activate(p, data, {"lora": net}, {})
    assert any("first image" in c for c in p.comments), p.comments
    for d in w0:
        want = w0[d] + deltas["a"].get(d, torch.zeros_like(w0[d]))
        torch.testing.assert_close(module_of(tiny, d).weight, want, rtol=0, atol=1e-6, msg=d)


def test_block_weights_from_the_tag(sd_model, tiny, loras):
    folder, deltas = loras
    w0 = _originals(tiny, deltas["a"])
    _, net = make_network(folder, lora_engine_mode="merged")
    _run_activate(net, sd_model, "<lora:a:0.5:lbw=OUTD>")  # OUTD: BASE and OUT03-OUT06 at 1, the rest 0
    on = {"te.encoder.layers.0.self_attn.q_proj", "te.encoder.layers.1.mlp.fc1",  # BASE
          "unet.up_blocks.1.attentions.1.proj_in"}  # output_blocks.4 = OUT04
    for d, dw in deltas["a"].items():
        want = w0[d] + 0.5 * dw if d in on else w0[d]
        torch.testing.assert_close(module_of(tiny, d).weight, want, rtol=0, atol=1e-6, msg=d)


def _broken_loha(path, tiny, name: str, dotted: str) -> None:
    """A LoHa that loads and fits by shape but fails inside its math ((o, r, 1) @ (r, i))."""
    o, i = module_of(tiny, dotted).weight.shape[:2]
    save_file({f"{name}.hada_w1_a": torch.randn(o, 2, 1), f"{name}.hada_w1_b": torch.randn(2, i),
               f"{name}.hada_w2_a": torch.randn(o, 2), f"{name}.hada_w2_b": torch.randn(2, i),
               f"{name}.alpha": torch.tensor(2.0)}, str(path))


def test_lora_failing_in_its_math_keeps_the_last_good_state_with_one_warning(sd_model, tiny, loras):
    folder, deltas = loras
    name, dotted = "lora_te_text_model_encoder_layers_0_self_attn_k_proj", "te.encoder.layers.0.self_attn.k_proj"
    _broken_loha(folder / "bad.safetensors", tiny, name, dotted)
    c, net = make_network(folder, lora_engine_mode="merged")
    _run_activate(net, sd_model, "<lora:a:1>")

    def weights():
        return {f"unet.{k}": v.detach().clone() for k, v in tiny.unet.state_dict().items()} | \
            {f"te.{k}": v.detach().clone() for k, v in tiny.text_encoders[0].state_dict().items()}

    good = weights()
    for mode in ("merged", "on the fly"):  # the second needs a change of mode, undone as well
        c.opts.values["lora_engine_mode"] = mode
        p, _ = _run_activate(net, sd_model, "<lora:b:1> <lora:bad:1>")  # does not raise into A1111
        lines = list(p.comments)
        assert len(lines) == 1 and "bad.safetensors" in lines[0] and name in lines[0], lines
        assert all(torch.equal(v, good[k]) for k, v in weights().items())  # still exactly <lora:a:1>
        assert c.runtime.engine.mode.value == "merged" and [v.mentioned for v in c.runtime.batch.variants] == ["a"]
    c.opts.values["lora_engine_mode"] = "merged"
    _run_activate(net, sd_model, "<lora:b:1>")  # a good stack applies as usual
    for d, dw in deltas["b"].items():
        assert not torch.equal(module_of(tiny, d).weight, good[d + ".weight"]), d


def test_lora_for_another_family_follows_the_setting(sd_model, tiny, loras):
    """A LoRA with SDXL's second-encoder keys is applied not at all, with one diagnosis line, unless the
    "Apply LoRAs made for another model family" setting is on (then the module that fits is)."""
    folder, _ = loras
    q = module_of(tiny, "te.encoder.layers.0.self_attn.q_proj").weight
    o, i = q.shape
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, i),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(o, 2),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 20),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(20, 2)},
              str(folder / "xl.safetensors"))
    w0 = q.detach().clone()
    c, net = make_network(folder, lora_engine_mode="merged")
    p, _ = _run_activate(net, sd_model, "<lora:xl:1>")
    (line,) = p.comments
    assert "SDXL LoRA on an SD1.x model" in line and "nothing of it was applied" in line, line
    assert torch.equal(q, w0)
    c.opts.values["lora_engine_force_foreign"] = True
    p, _ = _run_activate(net, sd_model, "<lora:xl:1>")
    (line,) = p.comments
    assert "SDXL LoRA on an SD1.x model" in line and "nothing of it was applied" not in line, line
    assert not torch.equal(q, w0)
