"""Admission by memory on a local Ray cluster (`skyrt fleet up` with no address, as on a laptop): one
logical GPU with room for three streams of the built-in model; the first three are admitted and run,
the fourth is refused and reported with its memory figures (needed vs free), and never started."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

import pytest
from ray_cluster import free_port, session_processes
from serving import get_json, wait_until

from skyrt.runtime.fleet.admission import stream_plan
from skyrt.runtime.fleet.config import parse_fleet_config

pytest.importorskip("ray")

DEFAULTS = {"height": 32, "width": 32, "steps": 2, "fps": 8, "guidance_scale": 1.0, "formats": ["mjpeg"],
            "cpus": 0.25, "threads": 1}


def test_three_streams_fit_one_logical_gpu_and_the_fourth_is_refused_with_its_figures(tmp_path):
    one = parse_fleet_config({"defaults": DEFAULTS, "streams": [{"id": "x"}]}).streams[0]
    need = stream_plan(one).total_bytes(1)  # every stream here has this plan (memory_plan is tested apart)
    memory = int(3.5 * need)
    port = free_port()
    defaults = ", ".join(f"{k}: {v}" if not isinstance(v, list) else f"{k}: [{', '.join(v)}]"
                         for k, v in DEFAULTS.items())
    (tmp_path / "fleet.yaml").write_text(f"""
name: mem
state_dir: state
no_token: true
ingress: {{port: {port}}}
gpus: [{{name: g0, memory: {memory / 2 ** 20:.6f}MiB}}]
defaults: {{{defaults}}}
streams: [{{id: s1}}, {{id: s2}}, {{id: s3}}, {{id: s4}}]
""")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SKYRT_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_enable_worker_prestart="0", RAY_prestart_worker_first_driver="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    log = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "skyrt.runtime.cli", "fleet", "up", "--config", "fleet.yaml",
                             "--local-cpus", "1"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def states():
        return {s["id"]: s for s in get_json(url + "/streams")["streams"]}

    try:
        wait_until(lambda: [states()[s]["state"] for s in ("s1", "s2", "s3")] == ["running"] * 3, 300,
                   lambda: (tmp_path / "up.log").read_text()[-3000:])
        listed = states()
        assert {listed[s]["gpu"] for s in ("s1", "s2", "s3")} == {"g0"}
        refused = listed["s4"]
        assert refused["state"] == "refused"
        figures = refused["memory"]
        assert figures["needed_bytes"] == need
        # the free figure is what the three admitted streams left: memory less three plans, nothing reserved
        assert figures["free_bytes"] == {"g0": int(float(f"{memory / 2 ** 20:.6f}") * 2 ** 20) - 3 * need}
        assert figures["free_bytes"]["g0"] < need
        assert f"needs {need / 2 ** 30:.3f} GiB" in refused["error"] and "free: g0" in refused["error"]
        assert refused["node"] is None  # never placed
        time.sleep(2.0)
        assert states()["s4"]["state"] == "refused"  # never started behind the report's back
        assert "stream s4 not started" in (tmp_path / "up.log").read_text()
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
        for pid in left:  # never leave a cluster running, even when an assertion above failed
            os.kill(pid, signal.SIGKILL)
        log.close()
    assert not left, f"processes of the local cluster outlived the command: {left}"
