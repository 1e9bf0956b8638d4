"""The fleet's parts without a Ray cluster: config validation, the ingress's routing, merged metrics
(read back by prometheus_client's own parser), the state file, fault detection, and one stream host
serving a real tiny pipeline in this process."""
from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest
from serving import get_json, request, wait_until

from skyrt.runtime.fleet import ConfigError, parse_fleet_config
from skyrt.runtime.fleet.config import StreamConfig, load_fleet_config, parse_stream_config
from skyrt.runtime.fleet.ingress import Route, node_url, route
from skyrt.runtime.fleet.prometheus import merge_with_label
from skyrt.runtime.fleet.store import FleetState, FleetStore, StreamRecord, merge_declared
from skyrt.runtime.fleet.stream_host import FAULT_LIMIT, HostSettings, StreamHost, fault_reason

# ------------------------------------------------------------------------------------------ config
GOOD = {"name": "lobby", "defaults": {"height": 32, "width": 32, "steps": 2, "fps": 8},
        "streams": [{"id": "a"}, {"id": "b", "prompt": "a blue square", "gpus": 0.5, "fps": 12}]}


def test_a_config_merges_defaults_and_builds_serve_flags():
    config = parse_fleet_config(GOOD)
    a, b = config.streams
    assert a.serve == {"height": 32, "width": 32, "steps": 2, "fps": 8}
    assert b.serve["fps"] == 12 and b.prompt == "a blue square"
    assert b.serve_argv()[:4] == ["--height", "32", "--width", "32"]
    assert (a.num_gpus, b.num_gpus) == (0.0, 0.5)
    assert parse_stream_config({"id": "g", "device": "cuda:0"}).num_gpus == 1.0  # one whole GPU per CUDA stream
    assert config.ingress.video == "redirect" and config.ingress.host == "127.0.0.1"


@pytest.mark.parametrize("data, words", [
    ({"streams": [{"id": "a"}], "colour": 1}, "unknown key(s) ['colour']"),
    ({"streams": [{"id": "A b"}]}, "lower-case letters"),
    ({"streams": [{"prompt": "x"}]}, "missing id"),
    ({"streams": [{"id": "a"}, {"id": "a"}]}, "repeated: ['a']"),
    ({"streams": [{"id": "a", "steps": "two"}]}, "steps must be an integer"),
    ({"streams": [{"id": "a", "mode": "sideways"}]}, "invalid choice: 'sideways'"),
    ({"streams": [{"id": "a", "backend": "tensorflow"}]}, "invalid choice: 'tensorflow'"),
    ({"streams": [{"id": "a", "playlist": {"items": [{"prompt": "x"}]}}]}, "missing field(s) ['duration_s']"),
    ({"streams": [{"id": "a", "playlist": {"items": []}}]}, "has no items"),
    ({"streams": [{"id": "a", "gpus": -1}]}, "gpus must be a number >= 0"),
    ({"streams": [{"id": "a", "token_file": "/nonexistent/token"}]}, "not found"),
    ({"streams": "a"}, "streams must be a list"),
    ({"ingress": {"video": "carrier-pigeon"}}, "ingress.video must be one of ['redirect', 'proxy']"),
    ({"ingress": {"port": 70000}}, "ingress.port must be a port number"),
])
def test_bad_configs_name_the_field_and_the_fix(data, words):
    with pytest.raises(ConfigError) as err:
        parse_fleet_config(data)
    assert words in str(err.value)


def test_a_config_file_reads_playlist_and_token_files_beside_it(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps({"items": [{"prompt": "a red fox", "duration_s": 5}]}))
    (tmp_path / "cafe.token").write_text("s3cret\n")
    (tmp_path / "fleet.yaml").write_text("name: f\nstate_dir: state\nstreams:\n"
                                         "  - {id: cafe, playlist: list.json, token_file: cafe.token}\n")
    config = load_fleet_config(tmp_path / "fleet.yaml")
    assert config.streams[0].playlist["items"][0]["prompt"] == "a red fox"
    assert config.state_dir == str(tmp_path / "state")
    (tmp_path / "bad.yaml").write_text("streams: [{id: a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_fleet_config(tmp_path / "bad.yaml")


def test_the_shipped_example_configs_validate():
    """deploy/fleet.yaml (the README's quickstart) and the fleet YAML inside the KubeRay example."""
    import yaml

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    config = load_fleet_config(deploy / "fleet.yaml")
    assert [s.id for s in config.streams] == ["circle", "square"] and config.streams[1].playlist["loop"]
    docs = list(yaml.safe_load_all((deploy / "kuberay" / "rayservice.yaml").read_text()))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    data = yaml.safe_load(config_map["data"]["fleet.yaml"])
    data.pop("token_file")  # a Secret mounted in the pods
    kube = parse_fleet_config(data)
    assert kube.ingress.video == "proxy" and all(s.num_gpus == 1 for s in kube.streams)


def test_the_serve_application_builder_refuses_a_fleet_without_a_given_token(tmp_path, monkeypatch):
    """Under KubeRay nobody would see a generated token: refused before anything starts (no Ray here)."""
    from skyrt.runtime.fleet.serve_app import app

    monkeypatch.delenv("SKYRT_TOKEN", raising=False)
    (tmp_path / "fleet.yaml").write_text("name: f\nstate_dir: state\nstreams: [{id: a}]\n")
    with pytest.raises(ConfigError, match="needs its control token given"):
        app({"config": str(tmp_path / "fleet.yaml")})
    with pytest.raises(ConfigError, match="args: {config: "):
        app({})


# ------------------------------------------------------------------------------------------ routes
@pytest.mark.parametrize("method, path, expected", [
    ("GET", "/streams", Route("list")),
    ("POST", "/streams", Route("method")),
    ("GET", "/metrics", Route("metrics")),
    ("GET", "/streams/a", Route("slash", "a")),
    ("GET", "/streams/a/", Route("page", "a", "/")),
    ("GET", "/streams/a/stream.mjpg", Route("video", "a", "/stream.mjpg")),
    ("GET", "/streams/a/hls/seg_1a2b_000001.m4s", Route("video", "a", "/hls/seg_1a2b_000001.m4s")),
    ("GET", "/streams/a/hls/live.m3u8", Route("forward", "a", "/hls/live.m3u8")),  # the playlist comes through here
    ("POST", "/streams/a/prompt", Route("forward", "a", "/prompt")),
    ("PUT", "/streams/a/playlist", Route("forward", "a", "/playlist")),
    ("POST", "/streams/a/stream.mjpg", Route("method", "a", "/stream.mjpg")),
    # WHEP signalling and LL-HLS (parts are waited on at the origin) come through to the stream's server.
    ("POST", "/streams/a/whep", Route("forward", "a", "/whep")),
    ("DELETE", "/streams/a/whep/Zx9_-k", Route("forward", "a", "/whep/Zx9_-k")),
    ("PATCH", "/streams/a/whep/Zx9_-k", Route("forward", "a", "/whep/Zx9_-k")),
    ("GET", "/streams/a/llhls/llpart_ab12_3_1.m4s", Route("forward", "a", "/llhls/llpart_ab12_3_1.m4s")),
    ("GET", "/streams/a/stream.mp4", Route("video", "a", "/stream.mp4")),
    ("GET", "/streams/../etc/passwd", Route("missing")),
    ("GET", "/streams/UPPER/status", Route("missing")),
    ("GET", "/elsewhere", Route("missing")),
])
def test_routes(method, path, expected):
    assert route(method, path) == expected


def test_node_urls_bracket_ipv6_and_keep_the_query():
    assert node_url(["10.0.0.7", 8123], "/stream.mjpg") == "http://10.0.0.7:8123/stream.mjpg"
    assert node_url(["::1", 80], "/status", "a=1") == "http://[::1]:80/status?a=1"


# ----------------------------------------------------------------------------------------- metrics
STREAM_TEXT = """# HELP skyrt_frames_generated_total Frames produced by the pipeline.
# TYPE skyrt_frames_generated_total counter
skyrt_frames_generated_total {n}
# HELP skyrt_clients Connected stream clients.
# TYPE skyrt_clients gauge
skyrt_clients{{format="mjpeg"}} {n}
# HELP skyrt_chunk_latency_seconds Time to generate one chunk.
# TYPE skyrt_chunk_latency_seconds histogram
skyrt_chunk_latency_seconds_bucket{{le="0.1"}} {n}
skyrt_chunk_latency_seconds_bucket{{le="+Inf"}} {n}
skyrt_chunk_latency_seconds_sum 0.5
skyrt_chunk_latency_seconds_count {n}
"""


def test_merged_metrics_parse_with_prometheus_client_and_keep_each_streams_values():
    from prometheus_client.parser import text_string_to_metric_families

    merged = merge_with_label({"a": STREAM_TEXT.format(n=3), "b": STREAM_TEXT.format(n=7)})
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert merged.count("# TYPE skyrt_clients gauge") == 1  # one family, both streams' samples under it
    clients = {s.labels["stream"]: s.value for s in families["skyrt_clients"].samples}
    assert clients == {"a": 3, "b": 7}
    histogram = families["skyrt_chunk_latency_seconds"]
    assert histogram.type == "histogram"
    counts = {s.labels["stream"]: s.value for s in histogram.samples if s.name.endswith("_count")}
    assert counts == {"a": 3, "b": 7}
    frames = families["skyrt_frames_generated"]  # the parser drops a counter's _total
    assert sorted((s.labels["stream"], s.value) for s in frames.samples) == [("a", 3), ("b", 7)]


# ------------------------------------------------------------------------------------------- store
def test_state_file_round_trip_is_owner_only_and_refuses_garbage(tmp_path):
    store = FleetStore(tmp_path, "f")
    stream = StreamConfig("a", {"height": 32}, playlist={"loop": True, "items": [
        {"prompt": "x", "duration_s": 5.0, "negative_prompt": None, "transition": "continue"}]})
    state = FleetState({"a": StreamRecord(stream, "tok", {"prompt": {"prompt": "y"}}, "h", starts=3)}, token="ft")
    store.save(state)
    loaded = store.load()
    assert loaded.streams["a"].config == stream and loaded.streams["a"].restarts == 2 and loaded.token == "ft"
    assert (store.path.stat().st_mode & 0o777) == 0o600  # it holds tokens
    store.path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="move it away"):
        store.load()


def test_saved_control_state_survives_unless_the_file_changed_the_streams_declaration():
    declared = StreamConfig("a", prompt="a red fox")
    state = FleetState()
    record, create = merge_declared(state, declared, None)
    assert create and record.control is None
    record.control = {"prompt": {"prompt": "switched over HTTP"}}
    state.streams["a"] = record
    again, create = merge_declared(state, declared, None)
    assert not create and again.control == {"prompt": {"prompt": "switched over HTTP"}}  # down + up keeps it
    edited = StreamConfig("a", prompt="a blue whale")
    again, create = merge_declared(state, edited, None)
    assert create and again.control is None  # the operator edited the file: the file wins


# ------------------------------------------------------------------------------------------ faults
HEALTHY = {"generator_alive": True, "pacer_alive": True}


def test_fault_reasons():
    snap = {"generator_errors": 5, "frames_generated": 100, "last_error": "RuntimeError: CUDA error"}
    assert fault_reason(HEALTHY, snap, errors_at_last_frame=5, seconds_since_frame=1, stall_s=60) is None
    assert "fault loop" in fault_reason(HEALTHY, snap, 5 - FAULT_LIMIT, 1, 60)
    assert "CUDA error" in fault_reason(HEALTHY, snap, 5 - FAULT_LIMIT, 1, 60)
    assert "no new frame for 61 s" in fault_reason(HEALTHY, snap, 5, 61, 60)
    assert fault_reason(HEALTHY, dict(snap, frames_generated=0), 5, 600, 60) is None  # still loading its model
    assert "pacer thread died" in fault_reason({"generator_alive": True, "pacer_alive": False}, snap, 5, 1, 60)


# -------------------------------------------------------------------------------- one stream host
SAMPLING = {"height": 32, "width": 32, "steps": 2, "fps": 12, "guidance_scale": 1.0, "formats": ["mjpeg", "hls"]}


class AlwaysFailing:
    """A pipeline whose every stream raises at once (a device that keeps failing)."""

    def resolve(self, settings, stream=False):
        from skyrt.runtime.resolve import resolve_request

        return resolve_request(settings, stream=stream)

    def stream(self, **settings):
        raise RuntimeError("simulated device fault")


@pytest.fixture
def host_of():
    hosts = []

    def start(pipe, **kwargs):
        host = StreamHost(StreamConfig("a", dict(SAMPLING), prompt="a red circle"), token="t0k", pipe=pipe, **kwargs)
        hosts.append(host)
        host.start()
        return host

    yield start
    for host in hosts:
        host.stop()


def test_a_stream_host_serves_pushes_control_before_answering_and_allows_cross_origin_video(
        official_pipeline, host_of):
    pushed = []
    host = host_of(official_pipeline, on_control=pushed.append)
    wait_until(lambda: host.phase == "running", 60)
    base = "http://%s:%d" % tuple(host.address)
    wait_until(lambda: get_json(base + "/status")["frames_output"] > 0, 60)
    status, body = request("POST", base + "/prompt", json.dumps({"prompt": "a green square"}).encode(), token="t0k")
    assert status == 200 and pushed and pushed[-1]["prompt"]["prompt"] == "a green square"
    assert request("POST", base + "/prompt", b'{"prompt": "x"}', token=None)[0] == 401  # the stream's token
    with urllib.request.urlopen(base + "/stream.mjpg", timeout=10) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    with urllib.request.urlopen(base + "/status") as r:
        assert r.headers.get("Access-Control-Allow-Origin") is None  # only video bytes
    info = host.info()
    assert info["phase"] == "running" and info["status"]["prompt"] == "a green square"


def test_a_stream_host_resumes_a_saved_playlist_position(official_pipeline, host_of):
    saved = {"prompt": {"prompt": "a blue square", "negative_prompt": None, "transition": "continue"},
             "playlist": {"loop": True, "index": 1, "elapsed_s": 2.0, "items": [
                 {"prompt": "a red circle", "duration_s": 600, "negative_prompt": None, "transition": "continue"},
                 {"prompt": "a blue square", "duration_s": 600, "negative_prompt": None, "transition": "continue"}]}}
    host = host_of(official_pipeline, control=saved)
    wait_until(lambda: host.phase == "running", 60)
    playlist = get_json("http://%s:%d/playlist" % tuple(host.address))
    assert playlist["position"]["index"] == 1 and playlist["position"]["elapsed_s"] >= 2.0
    assert host.info()["status"]["prompt"] == "a blue square"


def test_a_stream_hosts_http_settings_layer_is_kept_in_the_fleet_store_and_back_at_the_next_start(
        official_pipeline, host_of, tmp_path):
    """PUT /settings on a fleet stream reaches the controller (on_control) before its 200; the store
    keeps it, and the stream's next incarnation, started from the stored control, runs with it."""
    pushed = []
    host = host_of(official_pipeline, on_control=pushed.append)
    wait_until(lambda: host.phase == "running", 60)
    base = "http://%s:%d" % tuple(host.address)
    assert get_json(base + "/settings")["settings"]["shift"]["layer"] != "user"  # nothing set yet
    status, _ = request("PUT", base + "/settings", json.dumps({"shift": 6.5, "seed": 11}).encode(), token="t0k")
    assert status == 200 and pushed[-1]["settings"] == {"values": {"shift": 6.5, "seed": 11}}
    host.stop()
    store = FleetStore(tmp_path, "f")
    config = StreamConfig("a", dict(SAMPLING), prompt="a red circle")
    store.save(FleetState({"a": StreamRecord(config, "t0k", host.control_snapshot())}))
    control = store.load().streams["a"].control
    again = host_of(official_pipeline, control=control)
    wait_until(lambda: again.phase == "running", 60)
    settings = get_json("http://%s:%d/settings" % tuple(again.address))
    assert settings["http_control"] == {"shift": 6.5, "seed": 11}
    assert (settings["settings"]["shift"]["value"], settings["settings"]["shift"]["layer"]) == (6.5, "user")
    assert again.info()["status"]["prompt"] == "a red circle"


def test_a_generator_in_a_fault_loop_is_reported_fatal(host_of):
    fatal = threading.Event()
    reasons = []
    host = host_of(AlwaysFailing(), on_fatal=lambda reason: (reasons.append(reason), fatal.set()),
                   settings=HostSettings(stall_s=600))
    assert fatal.wait(30), "a generator failing every time was never declared fatal"
    assert "fault loop" in reasons[0] and "simulated device fault" in reasons[0]
    assert host.phase == "faulted"


def test_a_model_that_does_not_load_is_failed_not_restarted(tmp_path):
    fatal = []
    stream = StreamConfig("a", dict(SAMPLING, model=str(tmp_path / "no-such-model")))
    host = StreamHost(stream, token=None, on_fatal=fatal.append)
    host.start()
    try:
        wait_until(lambda: host.phase == "failed", 60)
    finally:
        host.stop()
    assert "no-such-model" in host.error and not fatal  # a restart would fail the same way: no loop


def test_the_fleet_benchmarks_mjpeg_reader_finds_each_frame_in_any_chunking():
    """benchmarks/fleet.py matches frames read two ways by their JPEG bytes: its parser must see each
    part whole, however the socket cut the bytes, and count a repeated frame once per arrival."""
    from benchmark_scripts import load_benchmark

    from skyrt.runtime.server.encoders import multipart_part

    bench = load_benchmark("fleet")
    frames = [bytes([i]) * (50 + 13 * i) for i in range(5)]
    stream = b"".join(multipart_part(f) for f in frames + [frames[1]])
    reader = bench.MjpegReader("http://unused", 0)
    buffer = bytearray()
    for t, start in enumerate(range(0, len(stream), 7)):  # 7-byte reads: heads and bodies split
        buffer += stream[start:start + 7]
        reader._parts(buffer, float(t))
    assert reader.frames == 6 and len(reader.arrivals) == 5 and not buffer
    first_seen = sorted(reader.arrivals.values())
    assert first_seen == sorted(set(first_seen))  # each frame dated when its last byte came
