"""``lora-engine serve`` as a real gradio server (subprocess) and a plain HTTP client: with ``--auth``
an unauthenticated client gets no page config, no API, no queue and no upload; after logging in it
gets the app; gradio's upload route is size-capped; and the server starts although every HTTP
request to localhost would go through a dead proxy (gradio's start-up self-checks)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.ui.files import lora_folder

httpx = pytest.importorskip("httpx")
pytest.importorskip("gradio", reason="the web UI needs gradio: pip install 'lora-engine[ui]'")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(args: list[str], cwd, env_extra: dict | None = None, timeout: float = 180):
    """Start ``python -m lora_engine serve ARGS`` and wait for its URL line; returns (proc, url, log path)."""
    port = free_port()
    log_path = os.path.join(cwd, f"serve-{port}.log")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1", **(env_extra or {}))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lora_engine", "serve", "--port", str(port), *args], cwd=cwd,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.time()
    while time.time() - t0 < timeout:
        text = open(log_path).read()
        if proc.poll() is not None:
            raise AssertionError("lora-engine serve exited: " + text[-3000:])
        if f"lora-engine serve: {url}" in text:
            return proc, url, log_path
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("lora-engine serve did not start: " + open(log_path).read()[-3000:])


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


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
