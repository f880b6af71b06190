"""``lora-engine serve`` as a real gradio server (subprocess) and a plain HTTP client: with ``--auth``
an unauthenticated client gets no page config, no API, no queue and no upload; after logging in it
gets the app; gradio's upload route is size-capped; and the server starts although every HTTP
request to localhost would go through a dead proxy (gradio's start-up self-checks)."""
from __future__ import annotations

import pytest

from tests.fixtures.files.ui import lora_folder
from tests.ui.serving import free_port, start_serve, stop

httpx = pytest.importorskip("httpx")
pytest.importorskip("gradio", reason="the web UI needs gradio: pip install 'lora-engine[ui]'")


def test_auth_keeps_everything_behind_the_login_and_uploads_are_capped(tmp_path):
    root = lora_folder(tmp_path / "loras")
    dead_proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request through it fails at once
    proc, url, log = start_serve(["--lora-dir", root, "--no-hash", "--auth", "alice:s3cret"], str(tmp_path),
                                 {"HTTP_PROXY": dead_proxy, "http_proxy": dead_proxy, "NO_PROXY": "", "no_proxy": ""})
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as anon:
            page = anon.get("/")
            assert "purple_style" not in page.text and "le-lib-cards" not in page.text
            for method, path in (("GET", "/config"), ("GET", "/gradio_api/info"), ("POST", "/gradio_api/queue/join"),
                                 ("GET", "/gradio_api/queue/data"), ("POST", "/gradio_api/run/predict"),
                                 ("GET", f"/gradio_api/file={root}/purple_style.png")):
                r = anon.request(method, path, json={} if method == "POST" else None)
                assert r.status_code in (401, 403), (path, r.status_code, r.text[:200])
                assert "purple_style" not in r.text and "PurpleStyle" not in r.text
            r = anon.post("/gradio_api/upload", files={"files": ("a.txt", b"x")})
            assert r.status_code in (401, 403)
            assert anon.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as user:
            assert user.post("/login", data={"username": "alice", "password": "s3cret"}).status_code == 200
            config = user.get("/config")
            assert config.status_code == 200 and "le-lib-cards" in config.text and "PurpleStyle" in config.text
            small = user.post("/gradio_api/upload", files={"files": ("a.txt", b"x" * 100)})
            assert small.status_code == 200, small.text[:200]
            big = user.post("/gradio_api/upload", files={"files": ("b.bin", b"x" * (2 << 20))})
            assert big.status_code == 413, (big.status_code, big.text[:200])
            for path in ("/etc/passwd", f"{root}/purple_style.safetensors"):  # gradio serves no file of ours
                r = user.get(f"/gradio_api/file={path}")
                assert r.status_code in (403, 404) and "root:" not in r.text, (path, r.status_code)
        assert "warning" not in open(log).read()
    finally:
        stop(proc)


def test_exposure_warning_and_auth_parsing():
    from lora_engine.apps.cli.serve_cmd import exposure_warning, parse_auth
    from lora_engine.errors import LoraEngineError

    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None
    assert exposure_warning("::1", None) is None and exposure_warning("0.0.0.0", ("a", "b")) is None
    assert "without --auth" in exposure_warning("0.0.0.0", None)
    assert "without --auth" in exposure_warning("192.168.1.5", None)
    assert parse_auth("bob:pa:ss") == ("bob", "pa:ss")
    for bad in ("bob", ":x", "bob:"):
        with pytest.raises(LoraEngineError):
            parse_auth(bad)


def test_serve_without_arguments_is_the_demo(tmp_path, monkeypatch):
    from lora_engine.apps.cli import build_parser
    from lora_engine.apps.cli.serve_cmd import config_from_args

    monkeypatch.chdir(tmp_path)
    config = config_from_args(build_parser().parse_args(["serve"]))
    assert config.lora_dirs == (str(tmp_path / "demo_out"),) and (tmp_path / "demo_out").is_dir()
    assert config.model == "demo" and config.out_dir == str(tmp_path / "demo_out")
    assert config.dataset_dirs == (str(tmp_path / "datasets"),) and config.confine and not config.allow_overwrite
