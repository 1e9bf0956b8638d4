"""WHEP through the fleet ingress, end to end: `skyrt fleet up` on a laptop (a local Ray cluster in
the command's own process), a viewer POSTs its SDP offer to the ingress's /streams/<id>/whep, gets
201 + the answer + a Location that resolves under the ingress, aiortc decodes advancing frames of
the stream (media over UDP straight from the stream's process; only the signalling passes the
ingress), and DELETE through the ingress ends the session on the stream's server."""
from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from ray_cluster import free_port, session_processes
from serving import get_json, wait_until

pytest.importorskip("ray")
import aiortc  # noqa: E402,F401  (in the serve extra: a missing one fails here rather than skipping)
from whep_client import whep_session  # noqa: E402


def test_a_whep_viewer_plays_a_fleet_stream_through_the_ingress(tmp_path):
    port = free_port()
    # webrtc follows mjpeg's neighbour hls's H.264 encode; MJPEG (proxied) is the picture's oracle.
    (tmp_path / "fleet.yaml").write_text(f"""
name: whep
state_dir: state
no_token: true
ingress: {{port: {port}, video: proxy}}
defaults: {{height: 32, width: 32, steps: 2, fps: 8, guidance_scale: 1.0, formats: [mjpeg, hls, webrtc]}}
streams:
  - id: one
""")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SKYRT_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_enable_worker_prestart="0", RAY_prestart_worker_first_driver="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    log = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "skyrt.runtime.cli", "fleet", "up", "--config", "fleet.yaml",
                             "--local-cpus", "1"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    stream = f"{url}/streams/one"
    try:
        wait_until(lambda: get_json(url + "/streams")["streams"][0]["state"] == "running", 180,
                   lambda: (tmp_path / "up.log").read_text()[-3000:])
        status, headers, (frames, jpegs), deleted, deleted_again = asyncio.run(whep_session(stream, frames_wanted=24))
        state = get_json(stream + "/status")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        deadline = time.monotonic() + 30
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in session_processes(proc.pid):  # never leave a cluster running
            os.kill(pid, signal.SIGKILL)
        log.close()
    assert status == 201, frames
    assert headers["Content-Type"].startswith("application/sdp")
    assert headers["Location"].startswith("whep/")  # relative: resolves to /streams/one/whep/<id>
    assert len(frames) == 24 and all(f.shape == (32, 32, 3) for f in frames)
    assert max(np.abs(a.astype(int) - b).mean() for a, b in zip(frames, frames[1:])) > 0.5  # advancing
    assert len(jpegs) >= 3 and min(np.abs(f.astype(int) - j).mean() for f in frames for j in jpegs) < 3.0
    # DELETE through the ingress reached the stream's server: the session is gone there.
    assert deleted == 200 and deleted_again == 404
    assert state["webrtc"]["sessions"] == 0 and state["webrtc"]["created"] == 1
