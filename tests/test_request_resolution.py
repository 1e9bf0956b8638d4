"""One request, resolved once at the edge (runtime/resolve.py): explicit values reach the sampler.

The bug this guards: with a preset, a value the user passed was replaced by the preset's when it equalled
the request type's default (`shift=8.0` ran Self-Forcing with its shift 5, `causal_block_size=1` ran
blocks of 3). Here every preset gets the diffusion-forcing defaults given explicitly (shift 8, blocks
of 1 latent frame, a ring of sink 1 + window 8) through every surface a user sets them on: the API, the
CLI (generate and serve), the server (in this process and in its generator child's loop), the server's
HTTP control endpoint (PUT /settings) and the fleet YAML; what the causal rollout is constructed with must
be those values. Nothing is read back from the resolver: the spy sits where the rollout takes its settings.
"""
from __future__ import annotations


import numpy as np
import pytest

import skyrt
from causal_checkpoints import load_recipes, write_model_folder
from skyrt.runtime import causal_rollout, cli, kvcache
from skyrt.runtime.causal_family import PRESETS
from skyrt.runtime.request import DEFAULTS
from skyrt.runtime.resolve import FLEET_YAML, ModelLayers, Settings, resolve_request
from skyrt.runtime.server import PromptChange, ServerConfig, StreamServer
from skyrt.runtime.server.generator_process import ProcessPipeline, PipelineSpec, _ChildLoop

RECIPES = load_recipes()
# Each preset's tiny model folder: the recipe of its family (causvid-warp4 reads CausVid's layout).
RECIPE_OF = {"self-forcing": "self_forcing", "causvid": "causvid", "causvid-warp4": "causvid", "longlive": "longlive",
             "causal-forcing-framewise": "causal_forcing_framewise", "causal-forcing-chunkwise": "causal_forcing_chunkwise",
             "rolling-forcing": "rolling_forcing"}
# The diffusion-forcing defaults, given explicitly: each must reach the sampler as given.
EXPLICIT = {"shift": 8.0, "causal_block_size": 1, "sink_blocks": 1, "window_blocks": 8}
assert {k: DEFAULTS[k] for k in EXPLICIT} == EXPLICIT  # they are the request type's defaults
SIZE = {"height": 32, "width": 48}  # 4 x 6 latents
CLI_FLAGS = ["--shift", "8.0", "--causal-block-size", "1", "--sink-blocks", "1", "--window-blocks", "8",
             "--height", "32", "--width", "48"]


class _Stop(Exception):
    """Raised by the spy once it has seen what the rollout is built with (nothing needs to run)."""


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict:
    folders = {name: write_model_folder(RECIPES[name], tmp_path_factory.mktemp(name) / "model")
               for name in set(RECIPE_OF.values())}
    out = {}
    for preset, name in RECIPE_OF.items():
        recipe, options = RECIPES[name], {}
        if recipe.get("lora"):
            options["lora_alpha"] = recipe["lora"]["alpha"]
        if preset == "causvid-warp4":
            options["checkpoint"] = folders[name] / recipe["checkpoint"]["file"]
        out[preset] = skyrt.load(folders[name], preset=preset, **options)
    return out


@pytest.fixture
def rollouts(monkeypatch):
    """Every preset rollout started while the test runs, as the sampler reads it: the shift its few-step
    tables are built with (causal_rollout.rollout_sampling, called per rollout) and the block size and
    ring the rollout core is constructed with. `rollouts.stop = True` raises _Stop right after the core's
    arguments are recorded (no denoising)."""
    real_sampling, real_core = causal_rollout.rollout_sampling, kvcache._core.RolloutCore
    shifts = []

    def sampling_spy(sampling, shift=None, **policy):
        shifts.append(shift)
        return real_sampling(sampling, shift=shift, **policy)

    def core_spy(*args, **kwargs):
        seen.append({"shift": shifts[-1] if shifts else None, "causal_block_size": kwargs["causal_block_size"],
                     "sink_blocks": kwargs["sink_blocks"], "window_blocks": kwargs["window_blocks"]})
        if seen.stop:
            raise _Stop
        return real_core(*args, **kwargs)

    class Seen(list):
        stop = True

    seen = Seen()
    monkeypatch.setattr(causal_rollout, "rollout_sampling", sampling_spy)
    monkeypatch.setattr(kvcache._core, "RolloutCore", core_spy)
    return seen


def _run_first_stream(server) -> None:
    with pytest.raises(_Stop):
        server.generator._run_stream()


# ------------------------------------------------------------------------------------ every surface
@pytest.mark.parametrize("preset", PRESETS)
def test_api_keywords_equal_to_the_defaults_reach_the_sampler(pipes, rollouts, preset):
    rollouts.stop = False  # one block of one frame, really denoised
    latents = pipes[preset].generate("x", num_frames=1, output="latent", seed=0, progress=False, **SIZE, **EXPLICIT)
    assert latents.shape == (16, 1, 4, 6) and np.isfinite(latents).all()
    assert rollouts == [EXPLICIT]
    rollouts.stop = True
    with pytest.raises(_Stop):
        next(pipes[preset].stream("x", **SIZE, **EXPLICIT))
    assert rollouts[-1] == EXPLICIT


@pytest.mark.parametrize("preset", PRESETS)
def test_cli_flags_equal_to_the_defaults_reach_the_sampler(pipes, rollouts, monkeypatch, tmp_path, preset):
    monkeypatch.setattr(cli, "_load", lambda args: pipes[preset])  # the tiny LongLive LoRA needs its own alpha
    with pytest.raises(_Stop):
        cli.main(["generate", "--model", str(tmp_path), "--preset", preset, *CLI_FLAGS, "--num-frames", "1",
                  "--no-progress", "--output", str(tmp_path / "out.mp4")])
    assert rollouts == [EXPLICIT]
    handed = {}
    monkeypatch.setattr("skyrt.runtime.server.serve", lambda spec, sampling, config, **kw: handed.update(
        spec=spec, sampling=sampling, config=config, prompt=kw["prompt"]))
    assert cli.main(["serve", "--model", str(tmp_path), "--preset", preset, "--no-token", *CLI_FLAGS]) == 0
    assert handed["spec"].options == {"preset": preset}
    # What serve() does with them: the server resolves them against the loaded model, once.
    _run_first_stream(StreamServer(pipes[preset], handed["sampling"], handed["config"], prompt=handed["prompt"]))
    assert rollouts[-1] == EXPLICIT


@pytest.mark.parametrize("preset", PRESETS)
def test_server_settings_equal_to_the_defaults_reach_the_sampler(pipes, rollouts, preset):
    server = StreamServer(pipes[preset], {**SIZE, **EXPLICIT}, ServerConfig(formats=("mjpeg",)),
                          prompt=PromptChange("a red circle"))
    assert server.config.fps == 16  # the preset's, as the server's pacer runs it
    _run_first_stream(server)
    assert rollouts == [EXPLICIT]
    # The generator child runs the request the server resolved, as it is.
    conn = _Conn()
    child = _ChildLoop(conn, pipes[preset])
    child._handle(("start", 1, server.resolution.with_prompt("a blue square"), {"image": None}))
    child._send_next_chunk()  # the spy stops the stream; the child reports it as the stream's error
    assert rollouts[-1] == EXPLICIT and conn.sent[-1][0] == "error"


@pytest.mark.parametrize("preset", PRESETS)
def test_http_control_settings_equal_to_the_defaults_reach_the_sampler(pipes, rollouts, preset):
    """The server's HTTP control (PUT /settings on the app `skyrt serve` runs): the stream starts on the
    preset's values, the PUT restarts it at a chunk boundary, and the rollout the generator thread then
    builds has the values as given; a value the preset cannot honour is a 409 naming both layers."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer
    from skyrt.runtime.server import create_app

    rollouts.stop = False  # the stream really runs (tiny frames), on the server's own threads
    p = PRESETS[preset]
    own = {"shift": p.sampling.timestep_shift, "causal_block_size": p.sampling.causal_block_size,
           "sink_blocks": p.ring.sink_blocks, "window_blocks": p.ring.window_blocks}
    server = StreamServer(pipes[preset], dict(SIZE), ServerConfig(formats=("mjpeg",), token="t"),
                          prompt=PromptChange("a red circle"))
    auth = {"Authorization": "Bearer t"}

    async def until(predicate, seconds=120.0):
        for _ in range(int(seconds / 0.05)):
            if predicate():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out; rollouts seen: {list(rollouts)}")

    async def scenario():
        async with TestClient(TestServer(create_app(server))) as client:
            await until(lambda: server.metrics.frames_generated > 0)
            assert list(rollouts) == [own]  # nothing set: the preset's
            conflict = await client.put("/settings", json={"num_inference_steps": 30}, headers=auth)
            error = (await conflict.json())["error"]
            assert conflict.status == 409 and '/settings "num_inference_steps": 30' in error, error
            assert f"{preset} preset" in error and "set by the user, HTTP control" in error, error
            reply = await client.put("/settings", json=EXPLICIT, headers=auth)
            assert reply.status == 200, await reply.text()
            await until(lambda: len(rollouts) > 1 and server.generator.running_resolution is server.resolution)
            restarted_at = server.metrics.frames_generated
            await until(lambda: server.metrics.frames_generated > restarted_at)  # the new stream streams
            return (await (await client.get("/settings")).json())["settings"]

    described = asyncio.run(scenario())
    assert rollouts[-1] == EXPLICIT and len(rollouts) == 2  # one restart, at a chunk boundary
    for key, value in EXPLICIT.items():
        assert described[key] == {"value": value, "layer": "user", "source": f'/settings "{key}":',
                                  "settable": True}, described[key]
    # The generator child runs the request the server resolved, as it is.
    conn = _Conn()
    child = _ChildLoop(conn, pipes[preset])
    rollouts.stop = True
    child._handle(("start", 1, server.resolution.with_prompt("a blue square"), {"image": None}))
    child._send_next_chunk()
    assert rollouts[-1] == EXPLICIT and conn.sent[-1][0] == "error"


@pytest.mark.parametrize("preset", PRESETS)
def test_fleet_yaml_keys_equal_to_the_defaults_reach_the_sampler(pipes, rollouts, tmp_path, preset):
    import yaml

    from skyrt.runtime.fleet.config import parse_fleet_config
    from skyrt.runtime.fleet.stream_host import StreamHost

    text = f"""
defaults: {{shift: 8.0, height: 32}}
streams:
  - id: a
    model: {tmp_path}
    preset: {preset}
    causal_block_size: 1
    sink_blocks: 1
    window_blocks: 8
    width: 48
    formats: [mjpeg]
"""
    stream = parse_fleet_config(yaml.safe_load(text)).streams[0]
    server = StreamHost(stream, token=None, pipe=pipes[preset])._build_server()
    assert str(server.resolution.source("shift")) == "user (shift:)"  # a `defaults:` key is the user's too
    _run_first_stream(server)
    assert rollouts == [EXPLICIT]


class _Conn:
    """The child's end of the pipe, recording what it sends."""

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)

    def send_bytes(self, data):
        self.sent.append(("bytes", len(data)))


def test_the_process_pipeline_resolves_against_the_childs_model_and_sends_the_request(pipes, monkeypatch):
    parent = ProcessPipeline(PipelineSpec("unused"))
    sent = []
    monkeypatch.setattr(parent, "_process", type("Alive", (), {"is_alive": lambda self: True})())
    monkeypatch.setattr(parent, "send", sent.append)
    with pytest.raises(Exception, match="start"):
        parent.resolve({"prompt": "x"}, stream=True)  # no model has reported its layers yet
    parent.layers = pipes["self-forcing"].layers  # what the child sends with "loaded"
    resolution = parent.resolve({"prompt": "x", **EXPLICIT}, stream=True)
    stream = parent.stream(request=resolution.request, image=None)
    (kind, stream_id, request, inputs), = sent
    assert (kind, inputs, stream.prompt) == ("start", {"image": None}, "x")
    assert request == resolution.request and {k: getattr(request, k) for k in EXPLICIT} == EXPLICIT


# ------------------------------------------------------------------------------------ the other rules
@pytest.mark.parametrize("preset", PRESETS)
def test_unset_values_take_the_presets(pipes, rollouts, preset):
    with pytest.raises(_Stop):
        pipes[preset].generate("x", num_frames=1, output="latent", progress=False, **SIZE)
    p = PRESETS[preset]
    assert rollouts == [{"shift": p.sampling.timestep_shift, "causal_block_size": p.sampling.causal_block_size,
                         "sink_blocks": p.ring.sink_blocks, "window_blocks": p.ring.window_blocks}]
    req = pipes[preset].resolve({"prompt": "x", "width": 48}).request
    assert (req.mode, req.num_inference_steps, req.guidance_scale, req.height, req.width, req.fps) == (
        "kvcache", len(p.sampling.denoising_step_list), 1.0, 480, 48, 16)


def test_layers_rank_default_command_model_preset_user():
    model = ModelLayers({"shift": 2.0, "height": 64, "num_inference_steps": 4}, "m/demo_model.json", "self-forcing", 1)
    settings = Settings({"prompt": "x", "width": 48}, command={"height": 128, "guidance_scale": 1.0, "seed": 3},
                        command_name="skyrt serve")
    resolution = resolve_request(settings, model)
    req, source = resolution.request, lambda k: str(resolution.source(k))
    assert (req.seed, source("seed")) == (3, "command (skyrt serve)")
    assert (req.height, source("height")) == (480, "preset (self-forcing)")  # preset over model over command
    assert (req.shift, source("shift")) == (5.0, "preset (self-forcing)")
    assert (req.width, source("width")) == (48, "user (width=)")
    assert (req.negative_prompt, source("negative_prompt")) == ("", "default")
    no_preset = resolve_request(settings, ModelLayers({"shift": 2.0, "height": 64}, "m/demo_model.json"))
    assert (no_preset.request.shift, str(no_preset.source("shift"))) == (2.0, "model (m/demo_model.json)")
    assert (no_preset.request.height, no_preset.request.guidance_scale) == (64, 1.0)  # model over command
    assert str(no_preset.source("causal_attention")).startswith("derived")


@pytest.mark.parametrize("user, surface, names", [
    ({"num_inference_steps": 30}, "API keyword", ("num_inference_steps=30", "self-forcing preset", "4 steps")),
    ({"num_inference_steps": 30}, "command line", ("--steps 30", "self-forcing preset", "pass 4")),
    ({"num_inference_steps": 30}, FLEET_YAML, ("steps: 30", "self-forcing preset")),
    ({"mode": "window"}, "command line", ("--mode window", "self-forcing preset", "kvcache")),
    ({"ar_step": 0}, "API keyword", ("ar_step=0", "self-forcing preset", "has no ar_step", "leave it unset")),
    ({"overlap_history": 17}, "API keyword", ("overlap_history=17", "self-forcing preset")),
    ({"addnoise_condition": 20.0}, "API keyword", ("addnoise_condition=20.0", "self-forcing preset")),
])
def test_what_the_preset_cannot_honour_is_an_error_naming_both_layers(user, surface, names):
    with pytest.raises(ValueError) as err:
        resolve_request(Settings({"prompt": "x", **user}, surface), ModelLayers(preset="self-forcing"))
    for name in names:
        assert name in str(err.value), str(err.value)
    assert "set by the user" in str(err.value)


def test_conflicts_through_the_api_and_the_cli(pipes, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"num_inference_steps=30 .*self-forcing preset.*distilled for 4 steps"):
        pipes["self-forcing"].generate("x", num_frames=9, num_inference_steps=30, **SIZE)
    monkeypatch.setattr(cli, "_load", lambda args: pipes["self-forcing"])
    for flags, named in ((["--steps", "30"], "--steps 30"), (["--mode", "window"], "--mode window"),
                         (["--ar-step", "0"], "--ar-step 0")):
        code = cli.main(["generate", "--model", str(tmp_path), "--preset", "self-forcing", *flags, *CLI_FLAGS,
                         "--num-frames", "9", "--output", str(tmp_path / "o.mp4")])
        err = capsys.readouterr().err
        assert code == 2 and named in err and "self-forcing preset" in err, err


def test_a_kvcache_stream_derives_its_own_ar_step_and_shows_an_overlap_it_does_not_use():
    shared = resolve_request({"prompt": "x", "mode": "kvcache", "overlap_history": 17, "causal_block_size": 2},
                             stream=True)  # 17 frames are 5 latents: not whole blocks of 2, but no window needs them
    assert shared.request.overlap_history is None
    assert str(shared.source("overlap_history")) == (
        "derived (a kvcache stream has no windows; overlap_history=17 is not used)")
    resolution = resolve_request({"prompt": "x", "mode": "kvcache", "num_inference_steps": 3}, stream=True)
    assert resolution.request.overlap_history is None and resolution.request.ar_step == 3
    assert str(resolution.source("ar_step")).startswith("derived")
    explicit = resolve_request({"prompt": "x", "mode": "kvcache", "num_inference_steps": 3, "ar_step": 1}, stream=True)
    assert (explicit.request.ar_step, str(explicit.source("ar_step"))) == (1, "user (ar_step=)")


def test_a_resolved_request_is_run_as_given(pipes, rollouts):
    pipe = pipes["self-forcing"]
    request = pipe.resolve({"prompt": "x", "num_frames": 1, "output": "latent", **SIZE, **EXPLICIT}).request
    with pytest.raises(_Stop):
        pipe.generate(request=request, progress=False)
    assert rollouts == [EXPLICIT]
    with pytest.raises(TypeError, match="not both"):
        pipe.generate(request=request, shift=5.0)
    with pytest.raises(ValueError, match="stream"):
        pipe.stream(request=request)  # a clip's request is not a stream's
    steps30 = resolve_request({"prompt": "x", "num_inference_steps": 30, "mode": "kvcache", **SIZE}).request
    with pytest.raises(ValueError, match="self-forcing preset"):
        pipe.generate(request=steps30)  # resolved without the preset: refused, not re-resolved


# ------------------------------------------------------------------------------------ --explain
def test_explain_prints_every_setting_with_its_layer_and_runs_nothing(pipes, monkeypatch, tmp_path, capsys):
    from skyrt.runtime.request import SETTINGS

    def no_load(args):
        raise AssertionError("--explain must not load the model")

    monkeypatch.setattr(cli, "_load", no_load)
    model = pipes["self-forcing"].model.path
    assert cli.main(["generate", "--model", str(model), "--preset", "self-forcing", "--shift", "8",
                     "--seed", "3", "--explain"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) == {f.name for f in SETTINGS}
    assert rows["shift"].split()[1:] == ["8.0", "user", "(--shift)"]
    assert rows["seed"].split()[1:] == ["3", "user", "(--seed)"]
    assert rows["num_inference_steps"].split()[1:] == ["4", "preset", "(self-forcing)"]
    assert rows["causal_block_size"].split()[1:] == ["3", "preset", "(self-forcing)"]
    assert rows["prompt"].endswith("command (skyrt generate)")
    assert rows["negative_prompt"].split()[1:] == ["''", "default"]
    assert "derived" in rows["condition_noise"] and "derived" in rows["causal_attention"]
    assert not (tmp_path / "out.mp4").exists()
    assert cli.main(["serve", "--model", str(model), "--preset", "longlive", "--explain"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["num_frames"].split()[1:3] == ["endless", "derived"]
    assert rows["window_blocks"].split()[1:] == ["2", "preset", "(longlive)"]
    assert rows["overlap_carry"].split()[1:] == ["'latent'", "command", "(skyrt", "serve)"]
