"""Any name a file can have and a tag can carry goes prompt -> tag -> file unchanged."""
from __future__ import annotations

import os
import shutil
import tempfile

from tests.optional import require

require("hypothesis")
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lora_engine.library.index import LoraLibrary
from lora_engine.syntax.prompt import LoraTag, parse_prompt
from tests.library.conftest import write_lora

# Not in tag names: ":" "<" ">" (grammar); not in file names: "/" NUL; "\\" is read as a separator.
names = (st.text(alphabet=st.characters(blacklist_characters=":<>/\\\x00", blacklist_categories=("Cs", "Cc")),
                 min_size=1, max_size=30)
         .map(str.strip)
         .filter(lambda n: n not in ("", ".", "..") and len(n.encode()) < 200))

_TEMPLATE = None


def _template() -> str:
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = write_lora(os.path.join(tempfile.mkdtemp(prefix="lora_tpl_"), "t.safetensors"))
    return _TEMPLATE


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(names, min_size=1, max_size=3, unique_by=str.lower), st.floats(-2, 2, allow_nan=False))
@example(["²0"], 0.0)  # a superscript digit: str.isdigit() is true, int() refuses it (a scan crashed)
@example(["lora10", "Lora2", "٣x"], 1.0)  # natural order over ASCII and Arabic-Indic decimals
def test_odd_names_resolve_from_tags(stems, weight):
    root = tempfile.mkdtemp(prefix="lora_names_")
    try:
        for stem in stems:
            shutil.copyfile(_template(), os.path.join(root, stem + ".safetensors"))
        lib = LoraLibrary([root], use_cache=False, hash_files=False, summarize_files=False)
        lib.scan()
        text = " ".join(LoraTag(s, weight, weight).to_text() for s in stems)
        tags = parse_prompt(text).tags
        assert [lib.resolve(t.name).stem for t in tags] == stems
    finally:
        shutil.rmtree(root, ignore_errors=True)
