"""The standalone web UI in a real headless Chromium (Debian's ``chromium`` package) driven by
Playwright's Python API: ``lora-engine serve`` runs as a subprocess on 127.0.0.1 over a LoRA
folder of real kohya files; the pages load, a card shows its metadata and hashes, search filters,
a resize runs with visible progress and writes the file, inspect shows the diagnosis, and the
Generate page draws a weight-sweep grid on the demo architecture.

Skipped (with the reason) when gradio, playwright or /usr/bin/chromium are missing. Set
``LORA_ENGINE_UI_SHOTS=DIR`` to keep one screenshot per page.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from safetensors.torch import load_file

from tests.ui.files import write_lora

pytest.importorskip("gradio", reason="the web UI needs gradio: pip install 'lora-engine[ui]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright: pip install playwright")
CHROMIUM = os.environ.get("LORA_ENGINE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("browser tests need Chromium: apt-get install -y chromium", allow_module_level=True)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Records every progress element gradio shows (3.41 and current both use these classes).
OBSERVE = """() => { window.__progress = []; new MutationObserver(() => {
  for (const el of document.querySelectorAll('.progress-text, .progress-level')) {
    window.__progress.push(el.textContent.trim()); } }).observe(document.body,
  {subtree: true, childList: true, characterData: true, attributes: true}); }"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc, log_path: str, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError("lora-engine serve exited: " + open(log_path).read()[-2000:])
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("lora-engine serve did not answer: " + open(log_path).read()[-2000:])


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_base):
    from tests.ui.files import lora_folder

    root = lora_folder(tmp_path_factory.mktemp("ui") / "loras")
    write_lora(os.path.join(root, "many.safetensors"), seed=5, rank=8, repeat=40)  # 160 modules: visible progress
    port = _free_port()
    log_path = os.path.join(os.path.dirname(root), "serve.log")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GRADIO_ANALYTICS_ENABLED="False")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lora_engine", "serve", "--lora-dir", root, "--model", demo_base,
                                 "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_up(url, proc, log_path)
        yield url, root
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(server[0])
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


def _choose(pg, dropdown: str, option: str) -> None:
    pg.locator(f"{dropdown} input").click()
    pg.locator(f'[data-testid="dropdown-option"][aria-label="{option}"]').first.click()


def _wait_text(pg, selector: str, needle: str, timeout: float = 60_000) -> str:
    pg.wait_for_function("([s, n]) => { const el = document.querySelector(s); return el && el.value.includes(n); }",
                         arg=[selector, needle], timeout=timeout)
    return pg.locator(selector).input_value()


def test_library_card_shows_metadata_and_search_filters(page, server):
    _, root = server
    card = page.locator('.le-card[data-key="purple_style"]')
    text = card.inner_text()
    sha = hashlib.sha256(open(os.path.join(root, "purple_style.safetensors"), "rb").read()).hexdigest()
    assert "PurpleStyle" in text and "SD1" in text and "trained on violet squares" in text and sha in text
    assert "A test style <b>not bold</b>" in text  # the description is shown as text, not markup
    assert card.locator("img").get_attribute("src").startswith("data:image/jpeg;base64,")
    assert page.locator(".le-card").count() == 4
    _shot(page, "library")
    page.locator("#le-lib-search textarea, #le-lib-search input").first.fill("violet")
    page.wait_for_function("document.querySelectorAll('.le-card').length === 1")
    assert page.locator(".le-card").first.get_attribute("data-key") == "purple_style"
    page.locator("#le-lib-search textarea, #le-lib-search input").first.fill("")
    page.wait_for_function("document.querySelectorAll('.le-card').length === 4")


def test_resize_runs_with_visible_progress(page, server):
    _, root = server
    _tab(page, "Tools")
    _tab(page, "Resize")
    _choose(page, "#le-resize-lora", "many")
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
    _shot(page, "tools")
    _tab(page, "Inspect")
    page.locator("#le-inspect-run").click()
    assert "format: kohya" in _wait_text(page, "#le-inspect-result textarea", "format:")


def test_train_starts_shows_progress_and_cancels(page, server, tmp_path):
    from lora_engine.apps.demo.concept import write_concept_images

    data = str(tmp_path / "images")
    write_concept_images(data, 4, seed=0)
    _tab(page, "Train")
    page.locator("#le-train-refresh").click()
    assert "state: idle" in _wait_text(page, "#le-train-status textarea", "state:")
    page.locator("#le-train-data textarea").fill(data)
    page.locator("#le-train-out textarea").fill("ui_trained")
    page.locator("#le-train-steps input").fill("100000")
    page.locator("#le-train-start").click()
    page.wait_for_function("/step [1-9][0-9]*\\/100000/.test(document.querySelector('#le-train-status textarea').value)",
                           timeout=180_000)
    page.locator("#le-train-cancel").click()
    text = _wait_text(page, "#le-train-status textarea", "state: cancelled", timeout=120_000)
    assert "output:" in text and "ui_trained.safetensors" in text
    assert os.path.isfile(os.path.join(server[1], "ui_trained.safetensors"))
    page.locator("#le-train-loss img").wait_for()
    _shot(page, "train")


def test_generate_page(page, server):
    _tab(page, "Generate")
    page.locator("#le-gen-weights textarea").fill("-1, 0, 1")
    page.locator("#le-gen-steps input").fill("2")
    page.locator("#le-gen-run").click()
    text = _wait_text(page, "#le-gen-result textarea", "grid", timeout=240_000)
    assert "1 × 3 grid" in text and "error" not in text
    page.locator("#le-gen-grid img").wait_for()
    _shot(page, "generate")
