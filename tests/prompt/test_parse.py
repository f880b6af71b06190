"""The tag grammar: A1111 1.10 behaviour for every form, plus our deliberate differences."""
from __future__ import annotations

import pytest

from lora_engine.syntax.prompt import LoraTag, StepPoint, parse_prompt


def one(text: str) -> LoraTag:
    p = parse_prompt(text)
    assert len(p.tags) == 1, p.warnings
    return p.tags[0]


@pytest.mark.parametrize("text, te, unet, dyn", [
    ("<lora:x>", 1.0, 1.0, None),                     # missing te is 1.0, not the default-multiplier setting
    ("<lora:x:0.5>", 0.5, 0.5, None),                 # missing unet equals te
    ("<lora:x:0.5:1>", 0.5, 1.0, None),
    ("<lora:x:1:te=0>", 0.0, 0.0, None),              # unet falls back to te AFTER te= overrides it
    ("<lora:x:te=0:unet=1>", 0.0, 1.0, None),         # the way to switch off only the TE
    ("<lora:x:unet=0.5>", 1.0, 0.5, None),
    ("<lora:x:0.3:unet=0.7:te=0.1>", 0.1, 0.7, None),
    ("<lora:x:1:1:8>", 1.0, 1.0, 8),
    ("<lora:x:1:dyn=4>", 1.0, 1.0, 4),
    ("<lora:x:1:1:8:dyn=2>", 1.0, 1.0, 2),            # named dyn overrides positional
    ("<lora:x:-0.5>", -0.5, -0.5, None),
    ("<lora:x:.5>", 0.5, 0.5, None),
    ("<lora:x:1e-1>", 0.1, 0.1, None),
    ("<lora:x:+2:-1.5E1>", 2.0, -15.0, None),
    ("<lora:x: 0.25 >", 0.25, 0.25, None),            # float() in A1111 accepts surrounding spaces
])
def test_weights_follow_a1111(text, te, unet, dyn):
    t = one(text)
    assert (t.name, t.te, t.unet, t.dyn) == ("x", te, unet, dyn)


@pytest.mark.parametrize("name", ["my lora", "style.v1.5", "キャラ✨", "a-b_c (1)", "x=y", "50%"])
def test_names_with_spaces_dots_unicode(name):
    assert one(f"<lora:{name}:0.7>").name == name


def test_lyco_alias_and_order():
    p = parse_prompt("<lyco:a:0.2> mid <lora:b:0.4>")
    assert [(t.kind, t.name) for t in p.tags] == [("lyco", "a"), ("lora", "b")]
    assert p.cleaned_text == "mid"


@pytest.mark.parametrize("text, cleaned", [
    ("a <lora:x:1> b", "a b"),
    ("a <lora:x:1> <lora:y:1> b", "a b"),
    ("a<lora:x:1>b", "ab"),
    ("<lora:x:1> a", "a"),
    ("a, <lora:x:1>, b", "a, , b"),                 # commas are the user's text: kept as A1111 does
    ("line1 <lora:x:1>\n<lora:y:1> line2", "line1\nline2"),
    ("keep <hypernet:h:1> and <foo:bar>", "keep <hypernet:h:1> and <foo:bar>"),  # not ours
    ("no tags  here", "no tags  here"),
])
def test_cleaned_text(text, cleaned):
    assert parse_prompt(text).cleaned_text == cleaned


def test_span_and_raw():
    text = "a <lora:x:0.5> b"
    t = one(text)
    assert t.raw == "<lora:x:0.5>" and text[t.span[0]:t.span[1]] == t.raw


@pytest.mark.parametrize("bad, reason", [
    ("<lora:b:zz>", "te 'zz' is not a number"),
    ("<lora:b:1:zz>", "unet 'zz' is not a number"),
    ("<lora:b:nan>", "not a number"),
    ("<lora:b:inf>", "not a number"),
    ("<lora:b:1:1:0.5>", "dyn '0.5' must be a whole number"),
    ("<lora:b:1:dyn=0>", "dyn '0' must be a whole number"),
    ("<lora::1>", "empty name"),
    ("<lora:b:lbw=NOPE>", "unknown block-weight preset 'NOPE'"),
    ("<lora:b:lbw=1,2,3>", "3 values"),
    ("<lora:b:lbw=1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,Q>", "'Q' is not a number"),
    ("<lora:b:lbwe=NOPE>", "unknown elemental preset"),
    ("<lora:b:start=-1>", "start '-1'"),
    ("<lora:b:stop=2.5>", "stop '2.5'"),
    ("<lora:b:step=5>", "must be A-B"),
])
def test_malformed_tag_is_skipped_alone(bad, reason):
    p = parse_prompt(f"<lora:a:1> {bad} <lora:c:0.3>")
    assert [t.name for t in p.tags] == ["a", "c"]          # A1111 would drop all three
    assert len(p.warnings) == 1
    assert p.warnings[0].startswith(bad) and reason in p.warnings[0] and "skipped" in p.warnings[0]
    assert bad not in p.cleaned_text                       # the broken tag is still removed, as A1111 does


def test_unclosed_tag_does_not_swallow_the_next():
    p = parse_prompt("x <lora:a:1 <lora:b:0.5> y")
    assert [t.name for t in p.tags] == ["b"]
    assert p.cleaned_text == "x <lora:a:1 y"
    assert len(p.warnings) == 1 and "unclosed" in p.warnings[0]


def test_case_of_type_and_unknown_args_warn_but_apply():
    p = parse_prompt("<LoRA:a:1> <lora:b:1:foo=3>")
    assert [t.name for t in p.tags] == ["a", "b"]
    assert p.tags[1].extra == (("foo", "3"),)
    assert any("case-sensitive" in w for w in p.warnings) and any("foo=3" in w for w in p.warnings)


def test_old_lbw_positional_preset():
    p = parse_prompt("<lora:a:0.8:MIDD>")
    t = p.tags[0]
    assert t.lbw.source == "MIDD" and t.te == t.unet == 0.8
    assert "lbw=MIDD" in p.warnings[0]


def test_lbw_arguments():
    t = one("<lora:a:0.7:lbw=OUTS:lbwe=ATTNDEEPOFF:x=0.25:start=3:stop=0.75>")
    assert t.lbw.source == "OUTS" and t.lbw.length == 17
    assert t.lbwe == "ATTNDEEPOFF" and len(t.elements) == 1
    assert t.x == 0.25 and t.start == StepPoint(3.0) and t.stop == StepPoint(0.75)
    assert one("<lora:a:w=ALL>").lbw.source == "ALL"        # w= is LBW's short form


def test_step_range_and_fractions():
    t = one("<lora:a:step=0.25-0.5>")
    assert t.start.is_fraction and t.stop.is_fraction
    # 20 steps: fraction f is step max(1, round(f*20)) (1-based), i.e. on from index 4, off from index 9
    assert [i for i in range(20) if t.active_at(i, 20)] == list(range(4, 9))
    t = one("<lora:a:step=3-6>")
    assert [i for i in range(10) if t.active_at(i, 10)] == [2, 3, 4]   # on from step 3, off from step 6
    assert all(one("<lora:a:start=0>").active_at(i, 5) for i in range(5))
    assert one("<lora:a>").active_at(0, 1)


def test_custom_presets():
    p = parse_prompt("<lora:a:lbw=MINE>", presets={"MINE": ",".join(["0.5"] * 12)})
    assert p.tags[0].lbw.length == 12 and p.tags[0].lbw.source == "MINE"


def test_non_text_prompt_never_raises():
    p = parse_prompt(None)  # type: ignore[arg-type]
    assert p.tags == () and p.warnings


def test_to_text_round_trip_of_full_tag():
    t = one("<lyco:n a.me:0.5:-1:dyn=3:lbw=1,0,R,U,X+0.5,X-1,X,1,1,1,1,1:lbwe=PROJDEEPOFF:x=2:start=0.1:stop=9:k=v>")
    back = one(t.to_text())
    assert back == t
