"""Property tests on random and hostile prompts: the parser never raises, never loses a valid
tag because of a broken neighbour, round-trips odd names, and agrees with A1111's rules."""
from __future__ import annotations

import re

from tests.optional import require

require("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine.syntax.prompt import LoraTag, parse_prompt

# Names: anything but the characters the grammar reserves, no surrounding spaces.
names = st.text(alphabet=st.characters(blacklist_characters=":<>", blacklist_categories=("Cs",)),
                min_size=1, max_size=20).map(str.strip).filter(bool)
weights = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
hostile = st.lists(st.sampled_from(list("<>:=,-.lorayc xLbwe0123456789R\n\t\\\"'") + ["<lora:", "<lyco:", "lbw=", "\x00", "é", "🙂", "\u2028", "\x85", "\r"]),
                   max_size=30).map("".join)


# Broken neighbours: hostile text, and tags that are malformed (bad numbers, unclosed, empty...).
neighbours = st.one_of(hostile, hostile.map(lambda s: f"<lora:{s}>"), hostile.map(lambda s: f"<lora:{s}"),
                       st.sampled_from(["<lora:b:zz>", "<lora::1>", "<lora:b:lbw=NOPE>", "<lora:b:1:1:0.5>", "<lyco:",
                                        "<lora:b:nan:inf>", "<lora:b:start=-3>", "<<lora:>>"]))


def valid_tag(name: str, te: float, unet: float) -> str:
    return LoraTag(name, te, unet).to_text()


@settings(max_examples=300, deadline=None, database=None)
@given(st.one_of(st.text(max_size=200), hostile))
def test_never_raises(text):
    p = parse_prompt(text)
    assert isinstance(p.cleaned_text, str)
    assert all(isinstance(w, str) and len(w.splitlines()) == 1 for w in p.warnings)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.tuples(neighbours, names, weights, weights), min_size=1, max_size=5), hostile)
def test_valid_tags_survive_broken_neighbours(parts, tail):
    text = "".join(junk + valid_tag(n, te, un) for junk, n, te, un in parts) + tail
    got = [(t.name, t.te, t.unet) for t in parse_prompt(text).tags]
    want = [(n, te, un) for _, n, te, un in parts]
    it = iter(got)  # the valid tags appear, in order, among whatever else the junk produced
    assert all(w in it for w in want), (text, got)


@settings(max_examples=300, deadline=None, database=None)
@given(names, weights, weights, st.one_of(st.none(), st.integers(1, 512)))
def test_round_trip(name, te, unet, dyn):
    tag = LoraTag(name, te, unet, dyn)
    p = parse_prompt(f"before {tag.to_text()} after")
    assert p.tags == (tag,) and p.warnings == ()
    assert p.cleaned_text == "before after"


def a1111_oracle(text: str):
    """A1111 1.10's rules (``modules/extra_networks.py`` ``parse_prompt``/``ExtraNetworkParams``,
    ``extra_networks_lora.py`` ``activate``) written out independently, for comparison."""
    out = []
    for m in re.finditer(r"<(\w+):([^>]+)>", text):
        if m.group(1) not in ("lora", "lyco"):
            continue
        items = m.group(2).split(":")
        named, positional = {}, []
        for item in items:
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        te = float(positional[1]) if len(positional) > 1 else 1.0
        te = float(named["te"]) if "te" in named else te
        unet = float(positional[2]) if len(positional) > 2 else te
        unet = float(named["unet"]) if "unet" in named else unet
        dyn = int(positional[3]) if len(positional) > 3 else None
        dyn = int(named["dyn"]) if "dyn" in named else dyn
        out.append((positional[0], te, unet, dyn))
    return out


num = st.one_of(weights.map(repr), st.sampled_from(["1", "-0.5", ".5", "1e-1", "0", "2"]))
arg = st.one_of(num.map(lambda v: ("pos", v)), st.tuples(st.sampled_from(["te", "unet"]), num),
                st.integers(1, 64).map(lambda d: ("dyn", str(d))))
simple_names = st.text(alphabet=st.characters(blacklist_characters=":<>=", blacklist_categories=("Cs", "Z", "Cc")),
                       min_size=1, max_size=12)


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(st.tuples(simple_names, st.lists(arg, max_size=4)), min_size=1, max_size=4))
def test_agrees_with_a1111_on_well_formed_tags(spec):
    tags = []
    for name, args in spec:
        pos = [v for k, v in args if k == "pos"][:2]  # A1111 reads dyn positionally only as 4th item
        named = [f"{k}={v}" for k, v in args if k != "pos"]
        tags.append("<lora:" + ":".join([name] + pos + named) + ">")
    text = " , ".join(tags)
    ours = [(t.name, t.te, t.unet, t.dyn) for t in parse_prompt(text).tags]
    assert ours == a1111_oracle(text)
