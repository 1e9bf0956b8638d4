"""The laptop path of `skyrt fleet`: one command, no cluster address, so the command starts a local
Ray cluster in its own process; `video: proxy` so the video bytes come through the ingress itself.
Ctrl-C (SIGINT) stops the fleet and the cluster, keeps the state file, and leaves no process behind."""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from ray_cluster import free_port, session_processes
from serving import get_json, read_for, wait_until

pytest.importorskip("ray")


def test_one_command_on_a_laptop_serves_through_a_proxying_ingress_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    (tmp_path / "fleet.yaml").write_text(f"""
name: laptop
state_dir: state
no_token: true
ingress: {{port: {port}, video: proxy}}
defaults: {{height: 32, width: 32, steps: 2, fps: 8, guidance_scale: 1.0, formats: [mjpeg]}}
streams:
  - id: one
""")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SKYRT_TOKEN")}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    # Token auth as Ray's local default, with the token given here: Ray would otherwise write one to ~/.ray.
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_enable_worker_prestart="0", RAY_prestart_worker_first_driver="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    log = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "skyrt.runtime.cli", "fleet", "up", "--config", "fleet.yaml",
                             "--local-cpus", "1"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get_json(url + "/streams")["streams"][0]["state"] == "running", 180,
                   lambda: (tmp_path / "up.log").read_text()[-3000:])
        listed = get_json(url + "/streams")
        assert listed["video"] == "proxy"
        stream = listed["streams"][0]
        assert stream["address"][0] == "127.0.0.1"  # a laptop's stream stays on loopback
        with urllib.request.urlopen(f"{url}/streams/one/stream.mjpg", timeout=10) as r:
            assert r.url == f"{url}/streams/one/stream.mjpg"  # no redirect: the ingress carries the bytes
        data = read_for(f"{url}/streams/one/stream.mjpg", 2.0)
        assert len(re.findall(rb"\xff\xd8", data)) >= 5
        assert get_json(f"{url}/streams/one/status")["width"] == 32
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = session_processes(proc.pid)
        for pid in left:  # never leave a cluster running, even when the assertion below fails
            os.kill(pid, signal.SIGKILL)
        log.close()
    assert not left, f"processes of the local cluster outlived the command: {left}"
    saved = json.loads((tmp_path / "state" / "laptop.json").read_text())
    assert list(saved["streams"]) == ["one"]
