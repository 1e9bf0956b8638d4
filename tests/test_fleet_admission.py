"""Admission by memory on a local Ray cluster (`skyrt fleet up` with no address, as on a laptop, with two
logical GPUs that Ray counts but no real one): the streams booked on a logical GPU generate in that GPU's
one worker process, on the Ray GPU that worker holds, and share one loaded copy of the model, so the GPU
pays its weights once and cache + activations per stream.

g0 has room for the weights and three streams and a half, g1 for the weights and one stream and a half:
s1..s3 go to g0 (one model copy, one Ray GPU), s4 no longer fits g0 and goes to g1 (another worker,
another GPU), s5 fits nowhere and is refused with its figures (needed vs free per GPU), never started."""
from __future__ import annotations

import time

import pytest
from ray_cluster import free_port, local_fleet
from serving import get_json, wait_until

from skyrt.runtime.fleet.admission import stream_plan
from skyrt.runtime.fleet.config import parse_fleet_config

pytest.importorskip("ray")

DEFAULTS = {"height": 32, "width": 32, "steps": 2, "fps": 8, "guidance_scale": 1.0, "formats": ["mjpeg"],
            "cpus": 0.2, "gpus": 1, "threads": 1}
MIB = 2 ** 20


def _mib(nbytes: float) -> tuple[str, int]:
    """A memory size as the config writes it, and the bytes the config reads back from it."""
    text = f"{nbytes / MIB:.6f}"
    return f"{text}MiB", int(float(text) * MIB)


def test_streams_on_one_logical_gpu_share_its_worker_its_gpu_and_one_model_copy_and_the_last_is_refused(tmp_path):
    one = parse_fleet_config({"defaults": DEFAULTS, "streams": [{"id": "x"}]}).streams[0]
    plan = stream_plan(one)  # every stream here has this plan (memory_plan is tested apart)
    weights, own = plan.weights_bytes, plan.per_stream_bytes
    g0_text, g0 = _mib(weights + 3.5 * own)
    g1_text, g1 = _mib(weights + 1.5 * own)
    port = free_port()
    defaults = ", ".join(f"{k}: {v}" if not isinstance(v, list) else f"{k}: [{', '.join(v)}]"
                         for k, v in DEFAULTS.items())
    (tmp_path / "fleet.yaml").write_text(f"""
name: mem
state_dir: state
no_token: true
ingress: {{port: {port}}}
gpus: [{{name: g0, memory: {g0_text}}}, {{name: g1, memory: {g1_text}}}]
defaults: {{{defaults}}}
streams: [{{id: s1}}, {{id: s2}}, {{id: s3}}, {{id: s4}}, {{id: s5}}]
""")
    admitted = ("s1", "s2", "s3", "s4")
    with local_fleet(tmp_path, port, "--local-gpus", "2") as fleet:
        def states():
            return {s["id"]: s for s in get_json(fleet.url + "/streams")["streams"]}

        wait_until(lambda: [states()[s]["state"] for s in admitted] == ["running"] * 4, 300, fleet.log_tail)
        wait_until(lambda: all(states()[s].get("model_object_id") for s in admitted), 30, fleet.log_tail)
        listed = states()
        assert [listed[s]["gpu"] for s in admitted] == ["g0", "g0", "g0", "g1"]
        # Pinned: g0's streams generate in one process on one Ray GPU; g1's elsewhere, on the other.
        on_g0 = {(listed[s]["worker_pid"], tuple(listed[s]["gpus"])) for s in ("s1", "s2", "s3")}
        assert len(on_g0) == 1
        (pid0, gpus0), = on_g0
        assert len(gpus0) == 1 and listed["s4"]["worker_pid"] != pid0
        assert len(listed["s4"]["gpus"]) == 1 and listed["s4"]["gpus"] != list(gpus0)
        # One copy of the weights for g0's three streams (the very object), another for g1's stream.
        assert len({listed[s]["model_object_id"] for s in ("s1", "s2", "s3")}) == 1
        assert listed["s1"]["memory"]["weights_shared_with"] == ["s2", "s3"]
        # The accounting pays g0's weights once: what it has free is its memory less one copy and three streams.
        assert listed["s1"]["memory"]["gpu_free_bytes"] == g0 - weights - 3 * own
        assert listed["s4"]["memory"]["gpu_free_bytes"] == g1 - weights - own

        refused = listed["s5"]
        assert refused["state"] == "refused" and refused["node"] is None  # never placed
        figures = refused["memory"]
        assert figures["needed_bytes"] == {"g0": own, "g1": own}  # both GPUs hold its model already
        assert figures["free_bytes"] == {"g0": g0 - weights - 3 * own, "g1": g1 - weights - own}
        assert all(figures["free_bytes"][g] < own for g in ("g0", "g1"))
        assert f"g0: needs {own / 2 ** 30:.3f} GiB (its weights are loaded there)" in refused["error"]
        time.sleep(2.0)
        assert states()["s5"]["state"] == "refused"  # never started behind the report's back
        assert "stream s5 not started" in fleet.log.read_text()
        fleet.stop()
