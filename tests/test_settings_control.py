"""The server's HTTP control of generation settings (runtime/server/settings_control.py): GET /settings,
PUT/POST /settings on a real `skyrt serve` process with a tiny checkpoint, and on the same app in this
process where the pipeline's own refusal and the state file are looked at.

What a change does is read from the stream, not from the endpoint: in kvcache mode a chunk is one block
of `causal_block_size` latent frames, 4 pixel frames each, so frames generated per chunk (the server's
Prometheus counters, read in one consistent snapshot) is 4 before `{"causal_block_size": 2}` and 8 after.
The 409 of a value a preset cannot honour, and the explicit diffusion-forcing defaults reaching the sampler
through PUT /settings, are checked per preset in tests/test_request_resolution.py (the same app, on each
preset's tiny checkpoint).
"""
from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.request

import numpy as np
import pytest
from serving import TOKEN, get_json, request, running_server, until, wait_until

from skyrt.runtime.request import SETTINGS

SETTINGS_URL = "/settings"


@pytest.fixture(scope="module")
def server(official_dir):
    with running_server(official_dir) as (base, proc):
        yield base, proc


def _put(base, body, method="PUT", token=TOKEN):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(method, base + SETTINGS_URL, raw, token=token)


def _counters(base) -> tuple[int, int]:
    """(frames generated, chunks generated) from one /metrics answer (written under the metrics lock)."""
    text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    frames = int(float(re.search(r"^skyrt_frames_generated_total (\S+)$", text, re.M).group(1)))
    chunks = int(re.search(r"^skyrt_chunk_latency_seconds_count (\S+)$", text, re.M).group(1))
    return frames, chunks


def _frames_per_chunk(base, chunks: int = 3) -> float:
    """Frames per chunk over the next `chunks` chunks (counted from a chunk boundary: exact)."""
    start = _counters(base)
    wait_until(lambda: _counters(base)[1] >= start[1] + chunks, 60, lambda: "the stream stopped making chunks")
    end = _counters(base)
    return (end[0] - start[0]) / (end[1] - start[1])


def _wait_running(base) -> dict:
    """GET /settings once the generator runs the request it names."""
    wait_until(lambda: get_json(base + SETTINGS_URL)["running"], 60, lambda: "the new request never ran")
    frames, chunks = _counters(base)
    wait_until(lambda: _counters(base)[1] > chunks, 60)  # the new stream's first chunk (1 + 4k frames) is past
    return get_json(base + SETTINGS_URL)


def test_get_lists_every_setting_with_its_value_layer_and_source(server):
    base, _ = server
    assert _put(base, {})[0] == 200
    reply = get_json(base + SETTINGS_URL)
    settings = reply["settings"]
    assert list(settings) == [f.name for f in SETTINGS]
    assert all(set(entry) == {"value", "layer", "source", "settable"} for entry in settings.values())
    # FAST_SAMPLING's flags (the user's, on the command line), serve's own defaults, a field default, derived.
    assert settings["height"] == {"value": 32, "layer": "user", "source": "--height", "settable": False}
    assert settings["num_inference_steps"] == {"value": 2, "layer": "user", "source": "--steps", "settable": True}
    assert settings["guidance_scale"] == {"value": 1.0, "layer": "command", "source": "skyrt serve", "settable": True}
    assert settings["mode"]["value"] == "kvcache" and settings["mode"]["layer"] == "command"
    assert settings["shift"]["value"] == 8.0 and settings["shift"]["layer"] == "default"
    assert settings["ar_step"] == {"value": 2, "layer": "derived", "source": "kvcache stream: num_inference_steps",
                                   "settable": True}
    assert settings["num_frames"]["value"] is None and settings["num_frames"]["layer"] == "derived"  # endless
    assert settings["prompt"]["value"] == get_json(base + "/status")["prompt"]
    assert (reply["http_control"], reply["running"], reply["last_error"]) == ({}, True, None)


def test_put_restarts_the_stream_with_the_new_request_and_put_empty_gives_it_back(server):
    base, _ = server
    assert _put(base, {})[0] == 200
    _wait_running(base)
    assert _frames_per_chunk(base) == 4.0  # blocks of one latent frame
    code, reply = _put(base, {"causal_block_size": 2, "seed": 7})
    assert code == 200 and reply["ok"] and reply["http_control"] == {"causal_block_size": 2, "seed": 7}, reply
    described = _wait_running(base)["settings"]
    assert described["causal_block_size"] == {"value": 2, "layer": "user", "source": '/settings "causal_block_size":',
                                              "settable": True}
    assert _frames_per_chunk(base) == 8.0  # the running stream's blocks are two latent frames
    assert get_json(base + "/healthz")["ok"]
    # POST adds to the layer; PUT replaces it (PUT {} hands every value back to the layers below).
    code, reply = _put(base, {"shift": 6}, method="POST")
    assert code == 200 and reply["http_control"] == {"causal_block_size": 2, "seed": 7, "shift": 6.0}, reply
    assert reply["settings"]["shift"]["value"] == 6.0  # an integer for a number setting is that number
    code, reply = _put(base, {})
    assert code == 200 and reply["http_control"] == {}
    described = _wait_running(base)["settings"]
    assert described["causal_block_size"]["layer"] == "default" and described["seed"]["value"] is None
    assert _frames_per_chunk(base) == 4.0


BIG = json.dumps({"shift": 8.0, "pad": "x" * 70_000}).encode()  # over the server's 64 KiB body bound


@pytest.mark.parametrize("body, token, status, names", [
    ({"steps": 4}, TOKEN, 400, ['unknown setting "steps"', '"num_inference_steps"']),
    ({"shfit": 8.0}, TOKEN, 400, ['did you mean "shift"']),
    ({"shift": "8"}, TOKEN, 400, ['"shift" must be a number', "got a string", '"shift": 8.0']),
    ({"num_inference_steps": True}, TOKEN, 400, ['"num_inference_steps" must be an integer', "got a boolean"]),
    ({"num_inference_steps": 2.5}, TOKEN, 400, ["must be an integer"]),
    ({"shift": None}, TOKEN, 400, ["cannot be null", "leave it out"]),
    ({"shift": -1.0}, TOKEN, 400, ["shift=-1.0 must be positive"]),
    ({"seed": -1}, TOKEN, 400, ["seed=-1 must be a non-negative integer"]),
    ({"mode": "bogus"}, TOKEN, 400, ["mode='bogus' is not one of"]),
    ({"mode": "window", "causal_block_size": 3}, TOKEN, 400, ["overlap_history=5", "causal_block_size=3",
                                                               "try overlap_history=9"]),  # serve's overlap
    ({"height": 64}, TOKEN, 400, ['"height" cannot be set here', "--height"]),
    ({"prompt": "a fox"}, TOKEN, 400, ["POST /prompt"]),
    ([{"shift": 8.0}], TOKEN, 400, ["must be a JSON object of settings"]),
    (b'{"shift": NaN}', TOKEN, 400, ['"shift" must be a number']),
    (b'{"shift": 8.0', TOKEN, 400, ["not valid JSON"]),
    (b"[" * 5000, TOKEN, 400, ["nests"]),
    (BIG, TOKEN, 413, ["larger than"]),
    ({"shift": 8.0}, None, 401, ["unauthorized", "Bearer"]),
    ({"shift": 8.0}, "wrong", 401, ["unauthorized"]),
])
def test_bad_input_is_refused_with_the_fix_and_the_stream_goes_on(server, body, token, status, names):
    base, _ = server
    assert _put(base, {})[0] == 200
    before = get_json(base + "/status")["frames_generated"]
    for method in ("PUT", "POST"):
        code, reply = _put(base, body, method=method, token=token)
        assert code == status and all(name in reply["error"] for name in names), (code, reply)
    assert get_json(base + SETTINGS_URL)["http_control"] == {}  # nothing changed
    wait_until(lambda: get_json(base + "/status")["frames_generated"] > before, 60,
               lambda: "the stream stopped after bad input")
    assert get_json(base + "/healthz")["ok"]


def test_settings_survive_a_restart_with_state(official_dir, tmp_path):
    state = tmp_path / "state.json"
    with running_server(official_dir, "--state", str(state)) as (base, proc):
        assert _put(base, {"causal_block_size": 2, "seed": 7})[0] == 200
        saved = json.loads(state.read_text())  # a 200 means it is on disk
        assert saved["settings"] == {"values": {"causal_block_size": 2, "seed": 7}}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    with running_server(official_dir, "--state", str(state)) as (base, proc):
        reply = get_json(base + SETTINGS_URL)
        assert reply["http_control"] == {"causal_block_size": 2, "seed": 7}
        assert reply["settings"]["seed"] == {"value": 7, "layer": "user", "source": '/settings "seed":',
                                             "settable": True}
        _wait_running(base)
        assert _frames_per_chunk(base) == 8.0
        assert "resumed the HTTP settings" in proc.output()


# ------------------------------------------------------------------------------------ in this process
def _in_process(pipe, sampling: dict, scenario, **config):
    """Run `scenario(client, server)` against the app of a StreamServer on `pipe` (its threads running)."""
    from aiohttp.test_utils import TestClient, TestServer

    from skyrt.runtime.server import PromptChange, ServerConfig, StreamServer, create_app

    server = StreamServer(pipe, sampling, ServerConfig(formats=("mjpeg",), token=TOKEN, **config),
                          prompt=PromptChange("a red circle"))

    async def run():
        async with TestClient(TestServer(create_app(server))) as client:
            return await scenario(client, server)

    return asyncio.run(run())


FAST = {"height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 1.0, "mode": "kvcache", "fps": 12}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_a_change_the_pipeline_refuses_when_its_stream_opens_is_put_back(official_pipeline):
    """`causal_block_size=2` passes the request's checks, but an I2V stream's one-frame image does not split
    into blocks of 2: the pipeline refuses it when the stream opens. The settings before the change come
    back, GET names the error, and the stream goes on."""
    image = np.full((32, 32, 3), 128, np.uint8)

    async def scenario(client, server):
        await until(lambda: server.metrics.frames_generated > 0)
        reply = await client.put(SETTINGS_URL, json={"causal_block_size": 2}, headers=AUTH)
        assert reply.status == 200
        await until(lambda: server.settings_control.last_error is not None)
        described = await (await client.get(SETTINGS_URL)).json()
        frames = server.metrics.frames_generated
        await until(lambda: server.metrics.frames_generated > frames)  # streaming again, on the old request
        return described, server.request.causal_block_size

    described, blocks = _in_process(official_pipeline, {**FAST, "image": image}, scenario)
    assert described["http_control"] == {} and described["settings"]["causal_block_size"]["value"] == 1
    error = described["last_error"]
    assert error["settings"] == {"causal_block_size": 2} and error["reverted_to"] == {}
    assert "not a multiple of causal_block_size=2" in error["error"], error
    assert blocks == 1


def test_a_saved_layer_that_no_longer_resolves_is_reported_and_left_out(official_pipeline, tmp_path, caplog):
    from skyrt.runtime.server import PromptChange, ServerConfig, StreamServer

    state = tmp_path / "state.json"
    state.write_text(json.dumps({"version": 1, "prompt": {"prompt": "a blue square"}, "playlist": None,
                                 "settings": {"values": {"shift": "eight"}}}))
    server = StreamServer(official_pipeline, FAST, ServerConfig(formats=("mjpeg",), state_path=state),
                          prompt=PromptChange("a red circle"))
    assert server.settings_control.layer == {} and server.request.shift == 8.0
    assert server.board.current.prompt == "a blue square"  # the rest of the state is resumed
    assert '"shift" must be a number' in caplog.text
    state.write_text(json.dumps({"version": 1, "prompt": {"prompt": "a blue square"}, "playlist": None,
                                 "settings": {"values": {"shift": 3.0, "window_blocks": 2}}}))
    server = StreamServer(official_pipeline, FAST, ServerConfig(formats=("mjpeg",), state_path=state),
                          prompt=PromptChange("a red circle"))
    assert (server.request.shift, server.request.window_blocks) == (3.0, 2)
    assert str(server.resolution.source("shift")) == 'user (/settings "shift":)'
    server.save_state()
    assert json.loads(state.read_text())["settings"] == {"values": {"shift": 3.0, "window_blocks": 2}}
