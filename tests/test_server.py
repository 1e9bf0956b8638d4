"""`skyrt serve` end to end: a real server process on loopback, a real MJPEG read, the control API."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

TOKEN = "s3cret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(official_dir):
    port = _free_port()
    cmd = [sys.executable, "-m", "skyrt.runtime.cli", "serve", "--model", str(official_dir), "--port", str(port),
           "--height", "32", "--width", "32", "--steps", "2", "--base-num-frames", "9", "--overlap-history", "5",
           "--token", TOKEN, "--prompt", "a red circle"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1).read()
            break
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
    yield base, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def _post(url, body: bytes, token: str | None = TOKEN):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mjpeg_stream_delivers_jpeg_frames(server):
    base, _ = server
    with urllib.request.urlopen(base + "/stream.mjpg", timeout=60) as r:
        assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
        data = b""
        while data.count(b"\xff\xd9") < 2:  # two complete JPEGs
            data += r.read1(65536)
    first = data[data.index(b"\xff\xd8"): data.index(b"\xff\xd9") + 2]
    from io import BytesIO

    from PIL import Image

    assert Image.open(BytesIO(first)).size == (32, 32)


def test_status_and_page(server):
    base, _ = server
    status = json.loads(urllib.request.urlopen(base + "/status", timeout=5).read())
    assert status["prompt"] == "a red circle" and status["frames_published"] >= 0
    page = urllib.request.urlopen(base + "/", timeout=5).read().decode()
    assert "/stream.mjpg" in page


def test_prompt_switch_requires_token_and_valid_body(server):
    base, proc = server
    assert _post(base + "/prompt", b'{"prompt": "a blue square"}', token=None)[0] == 401
    assert _post(base + "/prompt", b'{"prompt": "x"}', token="wrong")[0] == 401
    assert _post(base + "/prompt", b"{not json", )[0] == 400
    assert _post(base + "/prompt", b'{"prompt": 3}')[0] == 400
    assert _post(base + "/prompt", b'{"prompt": "x", "extra": 1}')[0] == 400
    assert _post(base + "/prompt", json.dumps({"prompt": "x" * 1_000_000}).encode())[0] == 413
    assert _post(base + "/prompt", b'{"prompt": "a blue square"}') == (200, {"ok": True, "prompt": "a blue square"})
    deadline = time.monotonic() + 60
    while json.loads(urllib.request.urlopen(base + "/status", timeout=5).read())["prompt"] != "a blue square":
        assert time.monotonic() < deadline, "prompt switch never happened"
        time.sleep(0.2)
    assert proc.poll() is None  # bad input never took the server down


def test_sigterm_exits_cleanly(server):
    _, proc = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
