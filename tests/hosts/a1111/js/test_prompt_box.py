"""``javascript/lora_engine.js`` in a real headless Chromium (Playwright), on a stand-in of A1111 1.10.1's
txt2img top row (``a1111_page.html``, ``a1111_frontend.js``: the prompt DOM, ``opts``, the token counter's
hidden-button click 800 ms after typing, A1111's own Ctrl+Up/Down handler, card clicks), served with the
extension's real ``/sdapi/v1/loras``, ``/lora-engine/v1/names`` and cards over a real LoRA folder.

Ctrl+Up/Down must change only the number under the caret of a ``<lora:…>`` tag (te, unet, dyn, named
values), negative included, leave A1111's selection so the next press edits the same number, and leave
to A1111's handler what it already does right (a tag's last, positional weight). Autocomplete after
``<lora:`` must stay open through the token counter's synthetic click, offer and insert what the cards
insert, and close on a real click elsewhere.

Skipped at collection when playwright or Chromium is missing. ``LORA_ENGINE_JS=PATH`` runs the tests
against another script (see ``server.py``).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.browser import require

sync_api, CHROMIUM, ARGS = require()

from extension.controller import Controller  # noqa: E402
from tests.hosts.a1111.js.server import serve  # noqa: E402
from tests.hosts.a1111.standin import Opts  # noqa: E402

PROMPT = "#txt2img_prompt > label > textarea"
LIST = ".lora-engine-complete"


def _lora(path, meta=None):
    save_file({"lora_unet_x.lora_down.weight": torch.ones(1, 2), "lora_unet_x.lora_up.weight": torch.ones(2, 1)},
              str(path), metadata=meta or {})


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("a1111_js") / "Lora"
    for sub in ("bench", "other"):  # two files with one stem: the cards insert their folder paths
        (root / sub).mkdir(parents=True)
        _lora(root / sub / "lc_r1b.safetensors")
    _lora(root / "sd1_style0.safetensors")
    _lora(root / "moon.safetensors", {"ss_output_name": "Moonlight"})
    (root / "moon.json").write_text(json.dumps({"preferred weight": 0.6}))
    controller = Controller(Opts({"lora_engine_default_weight": 0.7}), [str(root)])
    with serve(controller) as url:
        yield url


@pytest.fixture(scope="module")
def tab():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page()
        pg.set_default_timeout(15_000)
        yield pg
        browser.close()


@pytest.fixture
def page(tab, site):
    """The stand-in page, freshly loaded."""
    tab.goto(site)
    tab.wait_for_function("window.standin && window.standin.ready")
    return tab


@pytest.fixture
def browser_page_without_script(tab, site):
    """The stand-in page with lora_engine.js answered empty: A1111's own behaviour only."""
    tab.route("**/javascript/lora_engine.js", lambda route: route.fulfill(body="", content_type="text/javascript"))
    try:
        tab.goto(site)
        tab.wait_for_function("window.standin && window.standin.ready")
        yield tab
    finally:
        tab.unroute("**/javascript/lora_engine.js")


def put(pg, text: str, start: int, end: int | None = None) -> None:
    """The prompt holds ``text`` with [start, end) selected (a caret when ``end`` is None), focused."""
    pg.evaluate("([sel, t, s, e]) => { const a = document.querySelector(sel); a.focus(); a.value = t;"
                " a.setSelectionRange(s, e); }", [PROMPT, text, start, start if end is None else end])


def caret_in(text: str, needle: str, offset: int = 1) -> int:
    return text.index(needle) + offset


def state(pg) -> tuple[str, str]:
    """(the prompt's text, its selected text)."""
    return tuple(pg.evaluate("sel => { const a = document.querySelector(sel);"
                             " return [a.value, a.value.slice(a.selectionStart, a.selectionEnd)]; }", PROMPT))


def key_edits(pg) -> int:
    return pg.evaluate("window.standin.keyEdits")


def presses(pg, key: str, n: int = 1) -> list[str]:
    out = []
    for _ in range(n):
        pg.keyboard.press(key)
        out.append(state(pg)[0])
    return out


def listed(pg, wait: bool = True) -> list[str] | None:
    """The names in the open autocomplete list (first text of each entry), or None when it is closed;
    with ``wait``, after up to 3 s for it to open (the names are fetched)."""
    js = ("sel => { const b = document.querySelector(sel); if (!b || !b.offsetParent) return null;"
          " return Array.from(b.children).map(c => c.firstChild.textContent); }")
    if wait:
        try:
            pg.wait_for_function(f"({js})({json.dumps(LIST)}) !== null", timeout=3000)
        except sync_api.TimeoutError:
            return None
    return pg.evaluate(js, LIST)


def closed(pg) -> bool:
    return listed(pg, wait=False) is None


def test_the_stand_in_alone_behaves_as_a1111_was_seen_to(browser_page_without_script):
    """With lora_engine.js blocked, A1111 1.10.1 moved a lone weight right, below zero too, and wrapped a
    selected tag in attention parentheses: the stand-in must do the same for the tests above to mean it."""
    pg = browser_page_without_script
    text = "<lora:sd1_style0:0.8>"
    put(pg, text, caret_in(text, "0.8"))
    assert presses(pg, "Control+ArrowUp") == ["<lora:sd1_style0:0.85>"]
    put(pg, "<lora:sd1_style0:0.1>", 3)
    assert presses(pg, "Control+ArrowDown", 3) == ["<lora:sd1_style0:0.05>", "<lora:sd1_style0:0.0>",
                                                   "<lora:sd1_style0:-0.05>"]
    text = "<lora:sd1_style0:0.95:0.1>"
    put(pg, text, 0, len(text))
    assert presses(pg, "Control+ArrowDown") == ["(<lora:sd1_style0:0.95:0.1>:0.9)"]


# ---- Ctrl+Up/Down ---------------------------------------------------------------------------------------


def test_a_single_weight_moves_by_a1111s_step_and_a1111_does_it(page):
    text = "a cat, <lora:sd1_style0:0.8>"
    put(page, text, caret_in(text, "0.8"))
    assert presses(page, "Control+ArrowUp", 2) == ["a cat, <lora:sd1_style0:0.85>", "a cat, <lora:sd1_style0:0.9>"]
    assert state(page)[1] == "lora:sd1_style0"  # where A1111 leaves it: the next press edits the same number
    assert key_edits(page) == 2  # A1111's own handler did both: it gets this case right


def test_weights_go_negative(page):
    text = "<lora:sd1_style0:0.1>"
    put(page, text, caret_in(text, "style"))
    assert presses(page, "Control+ArrowDown", 3) == ["<lora:sd1_style0:0.05>", "<lora:sd1_style0:0.0>",
                                                     "<lora:sd1_style0:-0.05>"]
    assert presses(page, "Control+ArrowUp") == ["<lora:sd1_style0:0.0>"]


def test_te_and_unet_each_move_where_the_caret_is(page):
    text = "x, <lora:sd1_style0:0.8:0.5>, y"
    put(page, text, caret_in(text, "0.8"))
    assert presses(page, "Control+ArrowUp", 2) == ["x, <lora:sd1_style0:0.85:0.5>, y", "x, <lora:sd1_style0:0.9:0.5>, y"]
    assert state(page)[1] == "lora:sd1_style0"
    put(page, text, caret_in(text, "0.5"))
    assert presses(page, "Control+ArrowDown", 2) == ["x, <lora:sd1_style0:0.8:0.45>, y",
                                                     "x, <lora:sd1_style0:0.8:0.4>, y"]
    put(page, text, caret_in(text, "sd1"))  # on the name: the te weight
    assert presses(page, "Control+ArrowDown") == ["x, <lora:sd1_style0:0.75:0.5>, y"]


def test_named_values_and_dyn(page):
    text = "<lora:moon:te=0.8:unet=0.4>"
    put(page, text, caret_in(text, "unet"))
    assert presses(page, "Control+ArrowUp", 2) == ["<lora:moon:te=0.8:unet=0.45>", "<lora:moon:te=0.8:unet=0.5>"]
    put(page, text, caret_in(text, "moon"))
    assert presses(page, "Control+ArrowUp") == ["<lora:moon:te=0.85:unet=0.4>"]
    text = "<lora:moon:0.5:0.5:4>"  # dyn is a rank: whole numbers, at least 1
    put(page, text, caret_in(text, ":4", 2))
    assert presses(page, "Control+ArrowUp") == ["<lora:moon:0.5:0.5:5>"]
    text = "<lora:moon:1:dyn=1>"
    put(page, text, caret_in(text, "dyn"))
    assert presses(page, "Control+ArrowDown") == [text]


def test_a_tag_without_weight_gets_one_next_to_its_name(page):
    put(page, "<lora:moon>", 3)
    assert presses(page, "Control+ArrowUp") == ["<lora:moon:1.05>"]  # te was 1 (A1111's default)
    assert presses(page, "Control+ArrowDown") == ["<lora:moon:1.0>"]
    text = "<lora:moon:unet=0.5>"
    put(page, text, caret_in(text, "moon"))
    assert presses(page, "Control+ArrowUp") == ["<lora:moon:1.05:unet=0.5>"]


@pytest.mark.parametrize("where", ["before '<'", "after '>'", "whole tag selected"])
def test_the_caret_at_a_tag_edge_or_the_whole_tag_selected_edits_its_weight(page, where):
    text = "a <lora:sd1_style0:0.8> b"
    start, end = text.index("<"), text.index(">") + 1
    put(page, text, *{"before '<'": (start,), "after '>'": (end,), "whole tag selected": (start, end)}[where])
    assert presses(page, "Control+ArrowUp", 2) == ["a <lora:sd1_style0:0.85> b", "a <lora:sd1_style0:0.9> b"]


def test_a_word_or_block_running_into_a_tag_is_left_alone(page):
    text = "cat<lora:sd1_style0:0.8>"
    put(page, text, 1)  # A1111 would take "cat<lora" as the word and wrap it
    assert presses(page, "Control+ArrowUp") == [text]
    text = "(cat <lora:sd1_style0:0.8>)"
    put(page, text, 2)  # A1111 would take the tag's "0.8>" as the block's weight
    assert presses(page, "Control+ArrowUp") == [text]
    text = "(cat <lora:sd1_style0:0.8>:1.2)"
    put(page, text, 2)
    assert presses(page, "Control+ArrowUp") == ["(cat <lora:sd1_style0:0.8>:1.3)"]


def test_everything_else_stays_a1111s(page):
    text = "a cat, <hypernet:h:0.5>"
    put(page, text, caret_in(text, "cat"))
    assert presses(page, "Control+ArrowUp") == ["a (cat:1.1), <hypernet:h:0.5>"]
    put(page, text, caret_in(text, "0.5"))
    assert presses(page, "Control+ArrowUp") == ["a cat, <hypernet:h:0.55>"]
    assert key_edits(page) == 2


# ---- autocomplete ---------------------------------------------------------------------------------------


def test_the_list_stays_open_through_the_token_counter(page):
    page.click(PROMPT)
    page.keyboard.type("a <lora:lc_r")
    assert listed(page) == ["bench/lc_r1b", "other/lc_r1b"]  # the names the cards insert
    page.wait_for_function("window.standin.tokenClicks >= 1")  # 800 ms later: the hidden button's click
    page.wait_for_timeout(200)
    assert listed(page, wait=False) == ["bench/lc_r1b", "other/lc_r1b"]
    page.keyboard.press("Tab")
    assert state(page)[0] == "a <lora:bench/lc_r1b:0.7>"
    assert closed(page)


@pytest.mark.parametrize("typed,card", [("lc_r1", "other/lc_r1b"), ("Moonl", "moon"), ("style", "sd1_style0")])
def test_autocomplete_inserts_what_the_card_inserts(page, typed, card):
    page.click(f'.card[data-name="{card}"]')
    from_card = state(page)[0].strip()
    put(page, "", 0)
    page.keyboard.type("<lora:" + typed)
    names = listed(page)
    assert card in names
    for _ in range(names.index(card)):
        page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    assert state(page)[0] == from_card and from_card.startswith(f"<lora:{card}:")


def test_completing_the_name_of_an_existing_tag_keeps_its_weights(page):
    put(page, "<lora::0.8:0.3>", len("<lora:"))
    page.keyboard.type("sd1")
    assert listed(page) == ["sd1_style0"]
    page.keyboard.press("Enter")
    assert state(page)[0] == "<lora:sd1_style0:0.8:0.3>"


def test_a_real_click_elsewhere_or_escape_closes_the_list(page):
    page.click(PROMPT)
    page.keyboard.type("<lora:")
    assert listed(page) == ["bench/lc_r1b", "moon", "other/lc_r1b", "sd1_style0"]
    page.evaluate("document.getElementById('txt2img_generate').click()")  # a script's click: not the user's
    assert not closed(page)
    page.mouse.click(700, 10)
    assert closed(page)
    page.focus(PROMPT)
    page.keyboard.type("m")
    assert listed(page) == ["moon"]
    page.keyboard.press("Escape")
    assert closed(page)
    assert state(page)[0] == "<lora:m"
