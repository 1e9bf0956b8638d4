"""Helpers for tests that run a real `skyrt serve` process on loopback, and a stream that fails on cue."""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

TOKEN = "s3cret"
# Tiny and fast: 32x32 frames, 2 steps, kvcache blocks of one latent frame (4 pixel frames).
FAST_SAMPLING = ["--height", "32", "--width", "32", "--steps", "2", "--fps", "12"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model_dir, *extra: str, ready_timeout: float = 90.0, token: str | None = TOKEN,
                   sampling=FAST_SAMPLING):
    """Start `skyrt serve` as a subprocess; yield (base_url, process); SIGTERM it afterwards.

    The token travels in $SKYRT_TOKEN (not argv: a token on the command line shows in the process
    list); token=None starts it with --no-token. The server's log goes to a file, so a chatty server
    can never block on a full pipe: `proc.output()` reads it."""
    port = free_port()
    cmd = [sys.executable, "-m", "skyrt.runtime.cli", "serve", "--model", str(model_dir), "--port", str(port),
           *([] if token else ["--no-token"]), *sampling, *extra]
    env = {k: v for k, v in os.environ.items() if k != "SKYRT_TOKEN"}
    if token:
        env["SKYRT_TOKEN"] = token
    log = tempfile.NamedTemporaryFile(prefix="skyrt-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    proc.output = lambda: Path(log.name).read_text(errors="replace")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get_json(base + "/status")["frames_output"] > 0, ready_timeout,
                   lambda: f"server never produced a frame:\n{_output(proc)}")
        yield base, proc
    finally:
        stop_process(proc)
        log.close()
        Path(log.name).unlink(missing_ok=True)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Ask a child to stop with `sig`; kill it if it has not exited within `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _output(proc) -> str:
    if proc.poll() is None:
        return "(still running)\n" + proc.output()[-4000:]
    return proc.output()


def process_gone(pid: int) -> bool:
    """Whether process `pid` has exited (gone, or a zombie its parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(predicate, timeout: float, message=lambda: "timed out"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(message())
        time.sleep(0.2)


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of a GET; 4xx/5xx do not raise."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def request(method: str, url: str, body: bytes | None = None, token: str | None = TOKEN):
    """(status, parsed JSON body) of a request; 4xx/5xx do not raise."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def read_for(url: str, seconds: float, max_bytes: int = 50_000_000, enough=None) -> bytes:
    """Read a streaming response for `seconds` (or until `max_bytes`, or until `enough(data)` holds)."""
    data = bytearray()
    deadline = time.monotonic() + seconds
    with urllib.request.urlopen(url, timeout=30) as r:
        while time.monotonic() < deadline and len(data) < max_bytes and not (enough and enough(data)):
            chunk = r.read1(65536)
            if not chunk:
                break
            data += chunk
    return bytes(data)


def require_tool(name: str) -> str:
    """Path of a system tool. `.ci/run` installs them and sets SKYRT_REQUIRE_SYSTEM_TOOLS=1, which
    turns a missing tool into a failure there; elsewhere the test is skipped with the install line."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("SKYRT_REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail(f"{name} is required here but missing (apt-get install chromium ffmpeg nginx)")
        pytest.skip(f"{name} not installed (apt-get install chromium ffmpeg nginx)")
    return path


def ffprobe(path) -> dict:
    """ffprobe's view of the first video stream of a file: codec, size, frame rate, frame count."""
    exe = require_tool("ffprobe")
    out = subprocess.run([exe, "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
                          "stream=codec_name,width,height,r_frame_rate,avg_frame_rate,nb_read_frames",
                          "-of", "json", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["streams"][0]


class PassThroughStream:
    """A stream that hands out `inner`'s chunks and forwards prompt changes; subclasses override
    __next__ to act on each chunk (fail on cue, record what was made)."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.inner)

    def set_prompt(self, *args, **kwargs):
        self.inner.set_prompt(*args, **kwargs)

    @property
    def prompt(self):
        return self.inner.prompt

    def close(self):
        self.inner.close()


class FaultAfter(PassThroughStream):
    """A stream that passes `after` chunks of `inner` through, then calls `fault()` for each next one:
    a fault that raises is a driver or device error, one that never returns is a hung driver call."""

    def __init__(self, inner, after: int, fault):
        super().__init__(inner)
        self.left, self.fault = after, fault

    def __next__(self):
        if self.left == 0:
            return self.fault()
        self.left -= 1
        return next(self.inner)


async def until(predicate, seconds: float = 60.0) -> None:
    """Await (in 50 ms polls on the running event loop) until `predicate()` holds; AssertionError after `seconds`."""
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


# ---------------------------------------------------------------- stream snapshots (runtime/snapshot.py)
def snapshot_header(data: bytes) -> dict:
    """The JSON header of a stream snapshot's bytes."""
    import numpy as np

    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return json.loads(npz["__header__"].tobytes())


def snapshot_arrays(data: bytes) -> dict:
    """A stream snapshot's arrays by name (everything but the header)."""
    import numpy as np

    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files if k != "__header__"}


def snapshot_blocks(path) -> int:
    """The block count the snapshot at `path` was taken at; -1 while there is none (or a half-read one)."""
    try:
        return int(snapshot_header(Path(path).read_bytes())["state"]["blocks"])
    except (OSError, ValueError, KeyError):
        return -1


def uninterrupted_state(pipe, header: dict) -> dict:
    """The arrays of an in-process stream of the snapshot's own request (its settings + prompt) taken to
    the snapshot's block: what a stream never interrupted holds there."""
    import warnings

    from skyrt.runtime.request import GenerationRequest

    state = header["state"]
    request = GenerationRequest(**header["settings"], prompt=state["prompt"], negative_prompt=state["negative_prompt"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stream = pipe.stream(request=request)
        for _ in range(state["blocks"]):
            next(stream)
    _, arrays = stream.export_state()
    stream.close()
    return arrays


def assert_same_stream_state(resumed: dict, want: dict, tolerance: float = 1e-5) -> float:
    """A resumed stream's snapshot arrays hold what the uninterrupted stream's do: the clean latents in
    the ring, the blocks in flight with their sampler history, the ring K/V and the decoder caches within
    fp32 `tolerance`; the same blocks at the same positions exactly. Returns the largest difference."""
    import numpy as np

    worst = 0.0
    for name in ("core/store", "core/slot_latents", "core/slot_history", "core/cache_k", "core/cache_v"):
        diff = float(np.abs(resumed[name].astype(np.float64) - want[name]).max())
        print(f"{name}: max |resumed - uninterrupted| = {diff:.3g}")
        worst = max(worst, diff)
    for name in [k for k in want if k.startswith("decoder/")]:
        worst = max(worst, float(np.abs(resumed[name] - want[name]).max()))
    print(f"max |resumed - uninterrupted| = {worst:.3g}")
    assert worst <= tolerance
    for name in ("core/schedule", "core/ring", "core/ring_slot_block", "core/store_block"):
        assert np.array_equal(resumed[name], want[name]), name  # the same blocks, at the same positions
    return worst
