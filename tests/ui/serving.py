"""Starting ``lora-engine serve`` as a user does (a subprocess with this checkout on PYTHONPATH) for the
server and browser tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

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
