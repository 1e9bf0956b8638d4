"""`skyrt fleet` on a real two-node Ray cluster on this machine (`ray start --head` + `ray start
--address`, fixed CPU counts, logical GPUs so that the one-stream-per-GPU placement is what Ray
enforces), three streams of the built-in model at 32x32, 2 steps, 8 fps.

Checked through the ingress, as clients see it: every stream's MJPEG and HLS play (ffprobe, HLS as
a player reads it: playlist through the ingress, segments by redirect); a prompt switch reaches only
its stream; bad input is a 4xx, a missing token a 401; killing one stream actor's process restarts
it (same URL, same playlist position) within RESTART_BOUND_S while the others keep their frame rate;
losing a node pends its stream until a GPU frees up, then it moves; `down` + `up` keeps every
stream's config and prompt. The cluster is torn down in a finalizer, and no process of it may remain.

The tests run in file order and share the cluster (bringing one up costs ~30 s on 2 cores).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from ray_cluster import LocalRayCluster, free_port
from serving import get_json, read_for, request, require_tool, wait_until

pytest.importorskip("ray")

TOKEN = "fleet-s3cret"
C_TOKEN = "c-own-token"
FPS = 8
ROOT = Path(__file__).resolve().parents[1]
RESTART_BOUND_S = 60.0  # kill -9 of a stream's actor process -> frames through the same URL again
PLACE_TIMEOUT_S = 180.0


def fleet_yaml(state_dir, port: int, c_token_file) -> str:
    return f"""
name: t
state_dir: {state_dir}
ingress: {{port: {port}}}
defaults: {{height: 32, width: 32, steps: 2, fps: {FPS}, guidance_scale: 1.0, formats: [mjpeg, hls], gpus: 1, cpus: 1}}
streams:
  - id: a
    prompt: a red circle bouncing on a dark blue background
  - id: b
    prompt: a blue square orbiting on a dark background
  - id: c
    prompt: a green triangle sliding left
    token_file: {c_token_file}
"""


def skyrt_fleet(*args: str, address: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `skyrt fleet ...` as a user would (a separate driver process)."""
    env = dict(os.environ, SKYRT_TOKEN=TOKEN)
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "skyrt.runtime.cli", "fleet", *args, "--address", address],
                            capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode in (0, 3), f"skyrt fleet {' '.join(args)} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The cluster (head: 2 CPUs, 2 GPUs; worker: 1 CPU, 1 GPU) and the fleet on it, brought up with
    `skyrt fleet up`; yields (api Fleet, ingress URL, cluster, config path)."""
    from skyrt.runtime.fleet import api

    folder = tmp_path_factory.mktemp("fleet")
    (folder / "c.token").write_text(C_TOKEN + "\n")
    config = folder / "fleet.yaml"
    port = free_port()
    config.write_text(fleet_yaml(folder / "state", port, folder / "c.token"))
    cluster = LocalRayCluster()
    environ = pytest.MonkeyPatch()
    try:
        for name, value in cluster.auth_env().items():  # this process and the `skyrt fleet` commands it runs
            environ.setenv(name, value)
        environ.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        _reload_ray_auth()
        cluster.start_head(num_cpus=2, num_gpus=2)
        cluster.worker = cluster.add_node(num_cpus=1, num_gpus=1)
        started = time.monotonic()
        skyrt_fleet("up", "--config", str(config), address=cluster.address)
        api.connect(cluster.address)
        handle = api.attach("t")
        handle.wait_until(lambda s: all(x["state"] == "running" for x in s), PLACE_TIMEOUT_S)
        print(f"fleet up and running in {time.monotonic() - started:.1f} s")
        yield handle, f"http://127.0.0.1:{port}", cluster, config
    finally:
        import ray

        ray.shutdown()
        left = cluster.stop()
        environ.undo()
        _reload_ray_auth()
        assert not left, f"Ray processes left behind: {left}"
        assert not _processes_mentioning(str(cluster.temp_dir)), "a process of the test cluster survived"


def _reload_ray_auth() -> None:
    """Ray reads its auth mode and token once per process, when it is imported (this module's
    importorskip): make this process see the cluster's token set above (Ray's own test helper)."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if text.encode() in open(f"/proc/{entry}/cmdline", "rb").read():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def by_id(status: list[dict]) -> dict:
    return {s["id"]: s for s in status}


def figures(url: str, stream: str) -> dict:
    return get_json(f"{url}/streams/{stream}/status")


# --------------------------------------------------------------------------------------- placement
def test_streams_spread_one_per_gpu_over_both_nodes(fleet):
    handle, url, _, _ = fleet
    streams = get_json(url + "/streams")["streams"]
    assert [s["state"] for s in streams] == ["running"] * 3
    placements = {(s["node"], s["gpus"][0]) for s in streams}
    assert len(placements) == 3 and all(len(s["gpus"]) == 1 for s in streams)  # one GPU each, never shared
    assert len({s["node"] for s in streams}) == 2
    out = skyrt_fleet("status", "--name", "t", "--json", address=fleet[2].address).stdout
    assert {s["id"] for s in json.loads(out)} == {"a", "b", "c"}


# --------------------------------------------------------------------------------------- playback
@pytest.mark.parametrize("stream", ["a", "b", "c"])
def test_every_stream_plays_mjpeg_and_hls_through_the_ingress(fleet, stream, tmp_path):
    ffprobe = require_tool("ffprobe")
    _, url, _, _ = fleet
    with urllib.request.urlopen(f"{url}/streams/{stream}/stream.mjpg", timeout=10) as r:
        assert r.url != f"{url}/streams/{stream}/stream.mjpg"  # redirected to the node that owns it
    (tmp_path / "live.mjpg").write_bytes(read_for(f"{url}/streams/{stream}/stream.mjpg", 2.0))
    mjpeg = _probe(ffprobe, ["-f", "mpjpeg", str(tmp_path / "live.mjpg")])
    assert (mjpeg["codec_name"], mjpeg["width"], mjpeg["height"]) == ("mjpeg", 32, 32)
    assert int(mjpeg["nb_read_frames"]) >= 5
    playlist = f"{url}/streams/{stream}/hls/live.m3u8"
    wait_until(lambda: urllib.request.urlopen(playlist).read().count(b".m4s") >= 2, 30)
    hls = _probe(ffprobe, [playlist], count_frames=False)  # FFmpeg's HLS player, following the redirects
    assert (hls["codec_name"], hls["width"], hls["height"]) == ("h264", 32, 32)


def _probe(ffprobe: str, source: list[str], count_frames: bool = True) -> dict:
    out = subprocess.run([ffprobe, "-v", "error", *(["-count_frames"] if count_frames else []),
                          "-select_streams", "v:0", "-show_entries", "stream=codec_name,width,height,nb_read_frames",
                          "-of", "json", *source], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["streams"][0]


# ---------------------------------------------------------------------------------------- control
def test_a_prompt_switch_reaches_only_its_stream(fleet):
    _, url, _, _ = fleet
    before = {s: figures(url, s)["prompt"] for s in "abc"}
    status, body = request("POST", f"{url}/streams/b/prompt",
                           json.dumps({"prompt": "a yellow star spinning"}).encode(), token=TOKEN)
    assert status == 200, body
    wait_until(lambda: figures(url, "b")["prompt_active"] == "a yellow star spinning", 30)
    assert figures(url, "a")["prompt"] == before["a"] and figures(url, "c")["prompt"] == before["c"]
    assert figures(url, "a")["prompt_active"] == before["a"] and figures(url, "c")["prompt_active"] == before["c"]


BAD_REQUESTS = [
    # (method, path, body, headers, status, words in the error)
    ("POST", "/streams/a/prompt", b'{"prompt": "x"}', {}, 401, "unauthorized"),
    ("POST", "/streams/a/prompt", b'{"prompt": "x"}', {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
    ("POST", "/streams/c/prompt", b'{"prompt": "x"}', {"Authorization": f"Bearer {TOKEN}"}, 401, "unauthorized"),
    ("POST", "/streams/a/prompt", b'{"prompt": 5}', "token", 400, "prompt must be a string"),
    ("POST", "/streams/a/prompt", b"not json", "token", 400, "not valid JSON"),
    ("POST", "/streams/a/prompt", b"[" * 100, "token", 400, "nests"),
    ("PUT", "/streams/a/playlist", b'{"items": [{"prompt": "x", "duration_s": -1}]}', "token", 400, "duration_s"),
    ("POST", "/streams/a/prompt", b'{"prompt": "x"}', {"Authorization": f"Bearer {TOKEN}",
                                                      "Content-Type": "text/plain"}, 415, "Content-Type"),
    ("POST", "/streams/a/prompt", b'{"prompt": "x"}', {"Authorization": f"Bearer {TOKEN}",
                                                      "Origin": "http://evil.example"}, 403, "cross-origin"),
    ("POST", "/streams/a/prompt", b"x" * 70_000, "token", 413, "larger than"),
    ("GET", "/streams/nope/status", None, {}, 404, "no stream 'nope'"),
    ("GET", "/streams/a/no-such-endpoint", None, {}, 404, "Not Found"),
    ("GET", "/streams/a/hls/../../etc/passwd.m4s", None, {}, 404, ""),
    ("GET", "/streams/a/hls/bad!name.m4s", None, {}, 400, "invalid HLS file name"),
    ("DELETE", "/streams/a/prompt", None, {}, 405, ""),
    ("POST", "/streams", b"{}", {}, 405, "not allowed"),
    ("POST", "/streams/a/stream.mjpg", b"{}", {}, 405, "not allowed"),
    ("GET", "/nowhere", None, {}, 404, "/streams"),
]


def test_bad_input_to_any_endpoint_is_a_4xx_and_a_missing_token_a_401(fleet):
    _, url, _, _ = fleet
    for method, path, body, headers, status, words in BAD_REQUESTS:
        if headers == "token":
            headers = {"Authorization": f"Bearer {TOKEN}"}
        req = urllib.request.Request(url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                got, text = r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            got, text = err.code, err.read().decode()
        assert got == status, (method, path, got, text)
        assert 400 <= got < 500
        assert words in text, (method, path, text)
        assert "error" in json.loads(text)
    # the per-stream token opens only its own stream
    assert request("POST", f"{url}/streams/c/prompt", b'{"prompt": "a green triangle"}', token=C_TOKEN)[0] == 200
    assert request("POST", f"{url}/streams/a/prompt", b'{"prompt": "x"}', token=C_TOKEN)[0] == 401
    assert all(s["state"] == "running" for s in get_json(url + "/streams")["streams"])


def test_metrics_carry_every_stream_with_a_stream_label(fleet):
    from prometheus_client.parser import text_string_to_metric_families

    _, url, _, _ = fleet
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    generated = {s.labels["stream"]: s.value for s in families["skyrt_frames_generated"].samples}
    assert set(generated) == {"a", "b", "c"} and all(v > 0 for v in generated.values())
    assert {s.labels["stream"] for s in families["skyrt_fleet_stream_restarts"].samples} == {"a", "b", "c"}


# ----------------------------------------------------------------------------------------- faults
def test_a_killed_stream_actor_restarts_with_its_playlist_position_while_the_others_keep_their_rate(fleet):
    handle, url, _, _ = fleet
    playlist = {"loop": True, "items": [{"prompt": "a red circle", "duration_s": 2},
                                        {"prompt": "a purple ring pulsing", "duration_s": 3600}]}
    assert request("PUT", f"{url}/streams/a/playlist", json.dumps(playlist).encode(), token=TOKEN)[0] == 200
    wait_until(lambda: figures(url, "a")["playlist"]["index"] == 1, 30)
    time.sleep(6)  # the position (item 1, ~4 s into it) reaches the controller within position_push_s
    pid = handle_pid(handle, "a")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    others = _measure_others_during(url, ["b", "c"], lambda: by_id(handle.status())["a"]["restarts"] == 1
                                    and figures(url, "a")["frames_generated"] > 0)
    back_in = time.monotonic() - killed
    print(f"stream a: killed actor pid {pid}, frames through the same URL again after {back_in:.1f} s; "
          f"others during the restart: {others}")
    assert back_in < RESTART_BOUND_S
    after = by_id(handle.status())["a"]
    assert after["restarts"] == 1 and after["state"] == "running" and handle_pid(handle, "a") != pid
    position = figures(url, "a")["playlist"]
    assert position["index"] == 1, position  # resumed on its item, not from the start
    assert figures(url, "a")["prompt"] == "a purple ring pulsing"
    for stream, rate in others.items():
        assert rate["output"] >= 0.9 * FPS, (stream, rate)  # players never stalled
        assert rate["generated"] >= 0.75 * FPS, (stream, rate)  # nor did the generators
    assert by_id(handle.status())["b"]["restarts"] == 0 and by_id(handle.status())["c"]["restarts"] == 0
    assert len(read_for(f"{url}/streams/a/stream.mjpg", 1.0)) > 0


def handle_pid(handle, stream: str) -> int:
    import ray

    from skyrt.runtime.fleet.actors import stream_actor_name
    from skyrt.runtime.fleet.config import NAMESPACE

    actor = ray.get_actor(stream_actor_name(handle.name, stream), namespace=NAMESPACE)
    return ray.get(actor.info.remote(), timeout=30)["node"]["pid"]


def _measure_others_during(url: str, streams, done, timeout: float = RESTART_BOUND_S) -> dict:
    """The others' frame rates from the kill until `done()` holds (the killed stream is back)."""
    start = {s: figures(url, s) for s in streams}
    wait_until(done, timeout, lambda: "the killed stream did not come back in time")
    end = {s: figures(url, s) for s in streams}
    rates = {}
    for s in streams:
        span = end[s]["uptime_s"] - start[s]["uptime_s"]
        rates[s] = {"seconds": round(span, 1),
                    "output": round((end[s]["frames_output"] - start[s]["frames_output"]) / span, 2),
                    "generated": round((end[s]["frames_generated"] - start[s]["frames_generated"]) / span, 2)}
    return rates


def test_losing_a_node_pends_its_stream_until_a_gpu_frees_then_it_moves(fleet):
    handle, url, cluster, _ = fleet
    import ray

    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
    streams = by_id(handle.status())
    (lost,) = [s for s in streams.values() if s["node"] != head]  # the worker node's one GPU
    head_streams = [s for s in streams.values() if s["node"] == head]
    assert len(head_streams) == 2
    cluster.kill_node(cluster.worker)
    status = handle.wait_until(lambda s: by_id(s)[lost["id"]]["state"] == "pending", 60)
    entry = by_id(status)[lost["id"]]
    assert "waiting for a node" in entry["error"] and entry["wants"] == {"CPU": 1.0, "GPU": 1.0}
    listed = by_id(get_json(url + "/streams")["streams"])[lost["id"]]
    assert listed["state"] == "pending"  # reported, not dropped
    assert request("GET", f"{url}/streams/{lost['id']}/status", token=None)[0] == 503
    assert all(by_id(status)[s["id"]]["state"] == "running" for s in head_streams)
    # Free a GPU on the head node: the pending stream moves there.
    freed = head_streams[0]["id"]
    skyrt_fleet("remove", freed, "--name", "t", address=cluster.address)
    # Removed is gone, not "retry later": after at most one address refresh the ingress answers 404.
    wait_until(lambda: request("GET", f"{url}/streams/{freed}/status", token=None)[0] == 404, 5)
    status = handle.wait_until(lambda s: by_id(s).get(lost["id"], {}).get("state") == "running", PLACE_TIMEOUT_S)
    moved = by_id(status)[lost["id"]]
    assert moved["node"] == head_streams[1]["node"] and moved["restarts"] >= 1
    assert freed not in by_id(status)
    # Added back with no GPU free anywhere: pending, and listed as such.
    skyrt_fleet("add", freed, "--name", "t", "--prompt", "added back", "--set", "height=32", "--set", "width=32",
                "--set", "steps=2", "--set", f"fps={FPS}", "--set", "guidance_scale=1.0", "--set", "cpus=1",
                "--set", "gpus=1", address=cluster.address)
    status = handle.wait_until(lambda s: by_id(s).get(freed, {}).get("state") == "pending", 60)
    assert len(status) == 3


def test_down_then_up_keeps_every_streams_config_and_prompt(fleet):
    handle, url, cluster, config = fleet
    import ray

    from skyrt.runtime.fleet.config import NAMESPACE

    cluster.worker = cluster.add_node(num_cpus=1, num_gpus=1)  # room for all three again
    status = handle.wait_until(lambda s: all(x["state"] == "running" for x in s), PLACE_TIMEOUT_S)
    # The stream removed and added back is a new actor under its old name: the ingress, which
    # served the old one, finds the new one at the first request.
    (added_back,) = [s["id"] for s in status if s.get("prompt") == "added back"]
    assert request("GET", f"{url}/streams/{added_back}/status", token=None)[0] == 200
    # A stream that kept its config all along (not the one removed and added back), switched over HTTP.
    stream = next(s["id"] for s in handle.status() if s["id"] != "c" and s.get("prompt") != "added back")
    switched = "an orange hexagon drifting"
    assert request("POST", f"{url}/streams/{stream}/prompt", json.dumps({"prompt": switched}).encode(),
                   token=TOKEN)[0] == 200
    out = skyrt_fleet("down", "--name", "t", address=cluster.address).stdout
    assert "down (3 stream(s) stopped" in out
    assert not [n for n in ray.util.list_named_actors(all_namespaces=True) if n.get("namespace") == NAMESPACE]
    skyrt_fleet("up", "--config", str(config), address=cluster.address)
    status = handle.wait_until(lambda s: len(s) == 3 and all(x["state"] == "running" for x in s), PLACE_TIMEOUT_S)
    assert {s["id"] for s in status} == {"a", "b", "c"}
    assert figures(url, stream)["prompt"] == switched  # the HTTP switch survived down + up
    assert all(s["restarts"] == 0 for s in status)  # counted per run of the fleet
    assert re.match(r"^--skyrtframe", read_for(f"{url}/streams/{stream}/stream.mjpg", 1.0).decode("latin-1"))


def test_the_kuberay_examples_serve_config_deploys_the_fleet(fleet, tmp_path):
    """deploy/kuberay/rayservice.yaml's serveConfigV2, deployed with `serve run` as KubeRay deploys
    it (Serve's controller builds the application from its import path and args): the fleet comes
    back behind a proxying ingress, its streams kept. The Kubernetes parts of the file are not run."""
    import yaml

    handle, url, cluster, config = fleet
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text()))
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    assert service["apiVersion"] == "ray.io/v1" and set(service["spec"]) >= {"serveConfigV2", "rayClusterConfig"}
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    fleet_config = yaml.safe_load(config.read_text())
    assert application["name"] == "skyrt-fleet-lobby"  # skyrt-fleet-<name>, the name `down` removes
    application["name"] = f"skyrt-fleet-{fleet_config['name']}"
    (tmp_path / "token").write_text(TOKEN + "\n")  # the example's token_file (no $SKYRT_TOKEN in a cluster)
    fleet_config.update(token_file=str(tmp_path / "token"), ingress={**fleet_config["ingress"], "video": "proxy"})
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(fleet_config))
    application["args"]["config"] = str(tmp_path / "fleet.yaml")
    serve_config["http_options"] = {"host": "127.0.0.1", "port": int(url.rsplit(":", 1)[1])}  # the running Serve's
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_config))
    before = {s["id"]: s["node"] for s in handle.status()}
    env = dict(os.environ)
    env.pop("SKYRT_TOKEN", None)
    result = subprocess.run([str(Path(sys.executable).with_name("serve")), "run", "--non-blocking", "--address",
                             cluster.address, str(tmp_path / "serve.yaml")], capture_output=True, text=True,
                            timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    wait_until(lambda: get_json(url + "/streams").get("video") == "proxy", 120)
    status = handle.wait_until(lambda s: all(x["state"] == "running" for x in s), PLACE_TIMEOUT_S)
    assert {s["id"]: s["node"] for s in status} == before  # the streams kept running where they were
    with urllib.request.urlopen(f"{url}/streams/a/stream.mjpg", timeout=10) as r:
        assert r.url == f"{url}/streams/a/stream.mjpg"  # carried by the ingress, as the example configures
    assert request("POST", f"{url}/streams/a/prompt", b'{"prompt": "x"}', token=None)[0] == 401
    assert request("POST", f"{url}/streams/a/prompt", b'{"prompt": "a red circle"}', token=TOKEN)[0] == 200
