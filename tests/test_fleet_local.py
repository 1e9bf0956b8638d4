"""The laptop path of `skyrt fleet`: one command, no cluster address, so the command starts a local
Ray cluster in its own process; `video: proxy` so the video bytes come through the ingress itself.
Ctrl-C (SIGINT) stops the fleet and the cluster, keeps the state file, and leaves no process behind;
the next `up` on that state file brings the stream back with the HTTP settings set through the fleet."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest
from ray_cluster import free_port, local_fleet
from serving import get_json, read_for, request, wait_until

pytest.importorskip("ray")

CONFIG = """
name: laptop
state_dir: state
no_token: true
ingress: {{port: {port}, video: proxy}}
defaults: {{height: 32, width: 32, steps: 2, fps: 8, guidance_scale: 1.0, formats: [mjpeg]}}
streams:
  - id: one
"""


def _running(fleet) -> None:
    wait_until(lambda: get_json(fleet.url + "/streams")["streams"][0]["state"] == "running", 180, fleet.log_tail)


def test_one_command_on_a_laptop_serves_through_a_proxying_ingress_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    (tmp_path / "fleet.yaml").write_text(CONFIG.format(port=port))
    with local_fleet(tmp_path, port) as fleet:
        url = fleet.url
        _running(fleet)
        listed = get_json(url + "/streams")
        assert listed["video"] == "proxy"
        stream = listed["streams"][0]
        assert stream["address"][0] == "127.0.0.1"  # a laptop's stream stays on loopback
        with urllib.request.urlopen(f"{url}/streams/one/stream.mjpg", timeout=10) as r:
            assert r.url == f"{url}/streams/one/stream.mjpg"  # no redirect: the ingress carries the bytes
        data = read_for(f"{url}/streams/one/stream.mjpg", 2.0)
        assert len(re.findall(rb"\xff\xd8", data)) >= 5
        assert get_json(f"{url}/streams/one/status")["width"] == 32
        status, _ = request("PUT", f"{url}/streams/one/settings", json.dumps({"shift": 6.5}).encode(), token=None)
        assert status == 200
        fleet.stop()
    saved = json.loads((tmp_path / "state" / "laptop.json").read_text())
    assert list(saved["streams"]) == ["one"]
    assert saved["streams"]["one"]["control"]["settings"] == {"values": {"shift": 6.5}}

    port = free_port()  # a fresh port: the first ingress's may linger in TIME_WAIT
    (tmp_path / "fleet.yaml").write_text(CONFIG.format(port=port))
    with local_fleet(tmp_path, port) as fleet:
        _running(fleet)
        settings = get_json(f"{fleet.url}/streams/one/settings")
        assert settings["http_control"] == {"shift": 6.5}
        assert (settings["settings"]["shift"]["value"], settings["settings"]["shift"]["layer"]) == (6.5, "user")
        fleet.stop()
