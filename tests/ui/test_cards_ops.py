"""Library cards, search and the Tools page's operations, without gradio (real files, independent math)."""
from __future__ import annotations

import base64
import hashlib
import io
import os

import torch
from safetensors.torch import load_file

from lora_engine.apps.ui import tool_ops
from lora_engine.apps.ui.cards import card_html, cards_html, filter_entries, sort_entries
from tests.fixtures.files.ui import write_lora


def _entry(ctx, stem):
    return next(e for e in ctx.library.entries if e.stem == stem)


def test_card_shows_metadata_hashes_badge_and_escapes(ctx, lora_root):
    e = _entry(ctx, "purple_style")
    html = card_html(e)
    sha = hashlib.sha256(open(os.path.join(lora_root, "purple_style.safetensors"), "rb").read()).hexdigest()
    assert sha in html and e.short_hash in html
    assert "PurpleStyle" in html and "trained on violet squares" in html and ">SD1<" in html
    assert "&lt;b&gt;not bold&lt;/b&gt;" in html and "<b>not bold" not in html
    assert "details (6 metadata keys)" in html and 'class="le-problem"' not in html


def test_card_preview_is_a_thumbnail_of_the_sidecar(ctx):
    from PIL import Image

    html = card_html(_entry(ctx, "purple_style"))
    uri = html.split('src="', 1)[1].split('"', 1)[0]
    assert uri.startswith("data:image/jpeg;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    r, g, b = im.getpixel((im.width // 2, im.height // 2))
    assert abs(r - 200) < 8 and abs(g - 40) < 8 and abs(b - 160) < 8
    assert "no preview" in card_html(_entry(ctx, "green_things"))


def test_search_by_metadata_alias_hash_and_architecture(ctx):
    entries = ctx.library.entries
    assert [e.stem for e in filter_entries(entries, "violet")] == ["purple_style"]
    assert [e.stem for e in filter_entries(entries, "GREENTHINGS")] == ["green_things"]
    h = _entry(ctx, "big_one").short_hash[:8]
    assert [e.stem for e in filter_entries(entries, h)] == ["big_one"]
    assert len(filter_entries(entries, "", "SD1")) == 3 and filter_entries(entries, "", "SDXL") == []
    assert "0 of 3 LoRA files" in cards_html([], 3)


def _delta(sd, name):
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    return float(sd[f"{name}.alpha"]) / down.shape[0] * (up @ down)


def test_resize_op_writes_rank_and_reports_discarded_energy(ctx, lora_root):
    calls = []
    text = tool_ops.resize_op(ctx, "green_things", "small", 3, progress=lambda d, t, w: calls.append((d, t)))
    assert text.startswith("wrote ") and "4/4 modules" in text
    assert calls[-1] == (4, 4) and [c[0] for c in calls] == [1, 2, 3, 4]
    src = load_file(os.path.join(lora_root, "green_things.safetensors"))
    out = load_file(os.path.join(lora_root, "small.safetensors"))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert out[f"{name}.lora_down.weight"].shape[0] == 3
    d0, d1 = _delta(src, name), _delta(out, name)
    s = torch.linalg.svdvals(d0)
    assert torch.allclose((d0 - d1).norm() ** 2, (s[3:] ** 2).sum(), rtol=1e-4)
    kept = float((s[:3].square().sum() / s.square().sum()).sqrt())
    assert f"{name}: rank 8 -> 3, retained {kept:.4f}" in text


def test_merge_op_exact_is_the_weighted_sum(ctx, lora_root):
    text = tool_ops.merge_op(ctx, "purple_style:1\ngreen_things:-0.5", "both", rank=0)
    assert text.startswith("wrote ") and "exact" in text
    a = load_file(os.path.join(lora_root, "purple_style.safetensors"))
    b = load_file(os.path.join(lora_root, "green_things.safetensors"))
    m = load_file(os.path.join(lora_root, "both.safetensors"))
    name = "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn2_to_v"
    assert torch.allclose(_delta(m, name), _delta(a, name) - 0.5 * _delta(b, name), atol=1e-5)


def test_inspect_and_convert_round_trip(ctx, lora_root):
    text = tool_ops.inspect_op(ctx, "sub/big_one")
    assert "format: kohya" in text and "architecture: sd1" in text
    assert tool_ops.convert_op(ctx, "purple_style", "as_peft", "peft").startswith("wrote ")
    assert os.path.isfile(os.path.join(lora_root, "as_peft", "adapter_config.json"))
    back = tool_ops.convert_op(ctx, "as_peft", "back", "kohya")  # a PEFT folder by its name in the folder
    assert back.startswith("wrote "), back
    a = load_file(os.path.join(lora_root, "purple_style.safetensors"))
    b = load_file(os.path.join(lora_root, "back.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_errors_are_one_line_and_write_nothing(ctx, lora_root):
    before = sorted(os.listdir(lora_root))
    for text in (tool_ops.resize_op(ctx, "no_such_lora", "x", 2),
                 tool_ops.resize_op(ctx, "green_things", "purple_style", 2),  # exists, overwrite off
                 tool_ops.merge_op(ctx, "", "x"),
                 tool_ops.inspect_op(ctx, "")):
        assert text.startswith("error: ") and "\n" not in text, text
    assert sorted(os.listdir(lora_root)) == before
    assert "exists" in tool_ops.resize_op(ctx, "green_things", "purple_style", 2)


def test_card_list_is_capped_with_a_note(ctx):
    html = cards_html(ctx.library.entries, limit=2)
    assert html.count('class="le-card"') == 2 and "showing the first 2" in html and "3 of 3" in html


def test_sort_by_title_date_and_size(ctx, lora_root):
    os.utime(os.path.join(lora_root, "sub", "big_one.safetensors"), ns=(1, 1))  # the oldest
    write_lora(os.path.join(lora_root, "zz_huge.safetensors"), seed=4, repeat=6,
               metadata={"ss_output_name": "AlphaFirst"})  # the newest and largest; its title sorts first
    ctx.scan()
    order = lambda how: [e.key for e in sort_entries(ctx.library.entries, how)]  # noqa: E731
    assert order("name") == ["zz_huge", "sub/big_one", "green_things", "purple_style"]  # AlphaFirst, big_one, G, P
    assert order("newest")[0] == "zz_huge" and order("oldest")[0] == "sub/big_one"
    sizes = [e.size for e in sort_entries(ctx.library.entries, "largest")]
    assert sizes == sorted(sizes, reverse=True) and order("smallest") == order("largest")[::-1]


def test_unreadable_file_is_one_line_on_its_card_and_never_the_default(ctx, lora_root):
    with open(os.path.join(lora_root, "aaa_broken.safetensors"), "wb") as fh:  # first by name
        fh.write(b"this is not a safetensors file at all")
    ctx.scan()
    e = _entry(ctx, "aaa_broken")
    html = card_html(e)
    assert e.unreadable and html.count('class="le-problem"') == 1 and "unreadable" in html
    assert ctx.choices()[0] == "aaa_broken" and ctx.default_choice() != "aaa_broken"
    assert ctx.default_choice("green_things") == "green_things" and ctx.default_choice("gone") != "aaa_broken"


def test_a_resized_copy_gets_its_own_title(ctx, lora_root):
    assert _entry(ctx, "purple_style").alias == "PurpleStyle"
    assert tool_ops.resize_op(ctx, "purple_style", "purple_small", 2).startswith("wrote ")
    assert tool_ops.merge_op(ctx, "purple_style:1", "purple_merged").startswith("wrote ")
    ctx.scan()
    titles = {e.key: e.alias for e in ctx.library.entries}
    assert titles["purple_small"] == "purple_small" and titles["purple_merged"] == "purple_merged"
    assert titles["purple_style"] == "PurpleStyle"
    assert load_file(os.path.join(lora_root, "purple_small.safetensors"))  # still a loadable file
