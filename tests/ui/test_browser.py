"""The standalone web UI in a real headless Chromium (Debian's ``chromium`` package) driven by
Playwright's Python API, as a newcomer meets it: ``lora-engine serve`` started with no arguments
(only a free port) in a folder where ``lora-engine demo --out demo_out`` has left its LoRA
``demo_purple``. The folder also holds real kohya files, an unreadable file that sorts first, and a
symlink to a LoRA outside it.

The Library shows the cards (one error line for the bad file, the link left out), searches, sorts
and draws a preview with the demo model; Tools lists a file added after the page loaded without a
refresh, never defaults to the unreadable file, resizes with visible progress and refuses paths
outside its folders; Train starts, shows progress and cancels; Generate makes a grid with
``demo_purple`` and leaves the unreadable row out with one line.

Skipped (with the reason) when gradio, playwright or /usr/bin/chromium are missing. Set
``LORA_ENGINE_UI_SHOTS=DIR`` to keep one screenshot per page.
"""
from __future__ import annotations

import os
import re

import pytest

from tests.fixtures.browser import require
from safetensors.torch import load_file

from tests.fixtures.files.ui import lora_folder, write_demo_lora, write_lora
from tests.ui.serving import start_serve, stop

pytest.importorskip("gradio", reason="the web UI needs gradio: pip install 'lora-engine[ui]'")
sync_api, CHROMIUM, ARGS = require()

SECRET = b"root:$6$TOPSECRET:19000:0:99999:7:::\n"
# Records every progress element gradio shows (3.41 and current both use these classes).
OBSERVE = """() => { window.__progress = []; new MutationObserver(() => {
  for (const el of document.querySelectorAll('.progress-text, .progress-level')) {
    window.__progress.push(el.textContent.trim()); } }).observe(document.body,
  {subtree: true, childList: true, characterData: true, attributes: true}); }"""
CARDS = 6  # demo_purple, purple_style, green_things, sub/big_one, many, a_broken (link_out is left out)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    from lora_engine.apps.demo.concept import write_concept_images

    home = tmp_path_factory.mktemp("home")
    demo_out = home / "demo_out"
    write_demo_lora(demo_out)  # what `lora-engine demo --out demo_out` leaves there
    lora_folder(demo_out)
    write_lora(demo_out / "many.safetensors", seed=5, rank=8, repeat=40)  # 160 modules: visible progress
    (demo_out / "a_broken.safetensors").write_bytes(SECRET)
    write_lora(home / "outside" / "secret.safetensors", seed=8)
    os.symlink(home / "outside" / "secret.safetensors", demo_out / "link_out.safetensors")
    write_concept_images(str(home / "datasets" / "images"), 4, seed=0)
    proc, url, log = start_serve([], str(home))
    try:
        yield url, str(demo_out)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def page(quickstart):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(quickstart[0])
        pg.wait_for_selector(".le-card")
        yield pg
        browser.close()


def _shot(pg, name: str) -> None:
    folder = os.environ.get("LORA_ENGINE_UI_SHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        pg.screenshot(path=os.path.join(folder, f"{name}.png"), full_page=True)


def _tab(pg, name: str) -> None:
    """Click a tab button (role="tab" in current gradio, a plain button in .tab-nav in 3.41)."""
    pg.locator("button[role=tab], .tab-nav button").filter(has_text=re.compile(rf"^\s*{name}\s*$")).first.click()


def _options(pg, dropdown: str) -> list[str]:
    pg.locator(f"{dropdown} input").click()
    opts = pg.locator('[data-testid="dropdown-option"]')
    opts.first.wait_for()
    names = [o.get_attribute("aria-label") or o.inner_text().strip() for o in opts.all()]
    pg.keyboard.press("Escape")
    return names


def _choose(pg, dropdown: str, option: str) -> None:
    pg.locator(f"{dropdown} input").click()
    pg.locator(f'[data-testid="dropdown-option"][aria-label="{option}"]').first.click()


def _wait_text(pg, selector: str, needle: str, timeout: float = 60_000) -> str:
    pg.wait_for_function("([s, n]) => { const el = document.querySelector(s); return el && el.value.includes(n); }",
                         arg=[selector, needle], timeout=timeout)
    return pg.locator(selector).input_value()


def _fill(pg, selector: str, text: str) -> None:
    pg.locator(f"{selector} textarea, {selector} input").first.fill(text)


def _card_keys(pg) -> list[str]:
    return pg.eval_on_selector_all(".le-card", "els => els.map(e => e.dataset.key)")


def test_library_shows_the_demo_lora_as_a_card_sorts_and_draws_a_preview(page, quickstart):
    demo = page.locator('.le-card[data-key="demo_purple"]')
    assert demo.locator(".le-title").inner_text() == "demo_purple" and demo.locator(".le-nopreview").count() == 1
    assert sorted(_card_keys(page)) == sorted(["demo_purple", "purple_style", "green_things", "sub/big_one", "many",
                                               "a_broken"])
    broken = page.locator('.le-card[data-key="a_broken"]')
    assert broken.locator(".le-problem").count() == 1 and "unreadable" in broken.inner_text()
    assert "TOPSECRET" not in page.content() and "root:$6$" not in page.content()
    card = page.locator('.le-card[data-key="purple_style"]')
    assert "PurpleStyle" in card.inner_text() and "A test style <b>not bold</b>" in card.inner_text()
    assert card.locator("img").get_attribute("src").startswith("data:image/jpeg;base64,")
    sha = __import__("hashlib").sha256(open(os.path.join(quickstart[1], "purple_style.safetensors"), "rb")
                                       .read()).hexdigest()
    assert sha in card.inner_html()
    _fill(page, "#le-lib-search", "violet")
    page.wait_for_function("document.querySelectorAll('.le-card').length === 1")
    _fill(page, "#le-lib-search", "")
    page.wait_for_function(f"document.querySelectorAll('.le-card').length === {CARDS}")
    page.locator("#le-lib-sort label").filter(has_text="largest").click()
    page.wait_for_function("document.querySelector('.le-card').dataset.key === 'many'")
    page.locator("#le-lib-sort label").filter(has_text="name").click()
    page.get_by_text("Make a preview image").click()
    assert page.locator("#le-prev-lora input").input_value() == "demo_purple"  # the first readable without one
    page.locator("#le-prev-steps input").fill("2")
    page.locator("#le-prev-run").click()
    assert "a purple" in _wait_text(page, "#le-prev-result textarea", "wrote", timeout=180_000)
    page.wait_for_function("document.querySelector('.le-card[data-key=\"demo_purple\"] img') !== null")
    assert os.path.isfile(os.path.join(quickstart[1], "demo_purple.preview.png"))
    _shot(page, "library")


def test_tools_lists_new_files_without_refresh_and_refuses_paths_outside(page, quickstart):
    _, root = quickstart
    write_lora(os.path.join(root, "fresh_one.safetensors"), seed=6)  # added after the page loaded
    _tab(page, "Tools")
    page.wait_for_function("document.querySelector('#le-inspect-lora input').value === 'demo_purple'")
    listed = set(_options(page, "#le-inspect-lora"))
    assert {"fresh_one", "demo_purple", "a_broken"} <= listed and "link_out" not in listed, listed
    page.locator("#le-inspect-run").click()
    assert "format: kohya" in _wait_text(page, "#le-inspect-result textarea", "format:")
    _tab(page, "Resize")
    _choose(page, "#le-resize-lora", "many")
    page.locator("#le-resize-out textarea").fill("../escape")
    page.locator("#le-resize-run").click()
    assert "refused" in _wait_text(page, "#le-resize-result textarea", "error")
    page.locator("#le-resize-out textarea").fill("many_r3")
    page.locator("#le-resize-rank input").fill("3")
    page.evaluate(OBSERVE)
    page.locator("#le-resize-run").click()
    text = _wait_text(page, "#le-resize-result textarea", "wrote")
    assert "160/160 modules resized" in text
    seen = page.evaluate("window.__progress")
    assert any(re.search(r"\d+/160", s) or s.startswith("resize:") for s in seen), seen[:20]
    out = load_file(os.path.join(root, "many_r3.safetensors"))
    assert {v.shape[0] for k, v in out.items() if k.endswith("lora_down.weight")} == {3}
    _tab(page, "Extract")
    for bad in ("/etc/passwd", "../outside/secret.safetensors", "link_out.safetensors"):
        page.locator("#le-extract-base textarea").fill(bad)
        page.locator("#le-extract-tuned textarea").fill("demo_purple.safetensors")
        page.locator("#le-extract-run").click()
        text = _wait_text(page, "#le-extract-result textarea", f"'{bad}'")  # the line names what was typed
        assert "refused" in text and "root:" not in text and "TOPSECRET" not in text, text
    _shot(page, "tools")
    _tab(page, "Library")
    page.wait_for_selector('.le-card[data-key="many_r3"]')  # the Library is fresh too
    assert page.locator('.le-card[data-key="many_r3"] .le-title').inner_text() == "many_r3"


def test_train_starts_shows_progress_and_cancels(page, quickstart):
    _tab(page, "Train")
    page.locator("#le-train-refresh").click()
    assert "state: idle" in _wait_text(page, "#le-train-status textarea", "state:")
    page.locator("#le-train-data textarea").fill("images")  # a folder in ./datasets
    page.locator("#le-train-out textarea").fill("ui_trained")
    page.locator("#le-train-steps input").fill("100000")
    page.locator("#le-train-start").click()
    page.wait_for_function("/step [1-9][0-9]*\\/100000/.test(document.querySelector('#le-train-status textarea').value)",
                           timeout=180_000)
    page.locator("#le-train-cancel").click()
    text = _wait_text(page, "#le-train-status textarea", "state: cancelled", timeout=120_000)
    assert "output:" in text and "ui_trained.safetensors" in text
    assert os.path.isfile(os.path.join(quickstart[1], "ui_trained.safetensors"))
    page.locator("#le-train-loss img").wait_for()
    _shot(page, "train")


def test_generate_grid_with_the_demo_lora_skips_the_unreadable_row(page):
    _tab(page, "Generate")
    tokens = page.locator("#le-gen-loras .token")
    tokens.first.wait_for()
    assert [t.inner_text().strip() for t in tokens.all()] == ["demo_purple"]  # the default: never a_broken
    _choose(page, "#le-gen-loras", "a_broken")
    page.keyboard.press("Escape")
    page.locator("#le-gen-weights textarea").fill("0, 1")
    page.locator("#le-gen-steps input").fill("2")
    page.locator("#le-gen-run").click()
    text = _wait_text(page, "#le-gen-result textarea", "grid", timeout=240_000)
    lines = text.splitlines()
    assert lines[0] == "1 × 2 grid" and sum(line.startswith("warning: a_broken: ") for line in lines) == 1, text
    page.locator("#le-gen-grid img").wait_for()
    _shot(page, "generate")
