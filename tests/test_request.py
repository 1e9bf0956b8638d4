"""The one request type (runtime/request.py) and every user of its fields.

Each test walks GenerationRequest's fields and checks one user takes every field it should, so a field
added to the type but not reaching generate, stream, the CLI, the server, the fleet config or a model's
recommendation fails here.
"""
from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from skyrt.runtime import request
from skyrt.runtime.pipeline import Pipeline
from skyrt.runtime.request import DEFAULTS, SETTINGS, STREAM_DEFAULTS, STREAM_EXCLUDED, GenerationRequest

# The official T2V settings (SkyReels-V2's README / generate_video_df.py defaults for 540P DF):
# written here by hand, the oracle for the request type's defaults.
OFFICIAL_T2V = {"num_frames": 97, "height": 544, "width": 960, "num_inference_steps": 30, "guidance_scale": 6.0,
                "shift": 8.0, "ar_step": 0, "causal_block_size": 1, "base_num_frames": 97, "overlap_history": None,
                "addnoise_condition": 0, "fps": 24}
GENERATE_INPUTS = ("image", "video", "end_image", "latents", "progress", "request")
STREAM_INPUTS = ("image", "video", "max_chunks", "request", "resume", "drift")


def _fields(exclude=()):
    return [f for f in SETTINGS if f.name not in exclude]


def test_every_field_declares_its_doc_its_flag_and_whether_a_model_may_recommend_it():
    for f in SETTINGS:
        meta = f.metadata
        assert {"doc", "cli", "recommended", "choices"} <= set(meta), f"{f.name}: declare it with setting(...)"
        assert meta["doc"] and "\n" not in meta["doc"], f"{f.name}: a one-line doc"
        assert meta["cli"] is None or (meta["cli"] == meta["cli"].lower() and " " not in meta["cli"]), f.name
        if meta["choices"] is not None and f.default not in (None, dataclasses.MISSING):
            assert f.default in meta["choices"], f.name
    assert {k: DEFAULTS[k] for k in OFFICIAL_T2V} == OFFICIAL_T2V


@pytest.mark.parametrize("method, exclude, inputs, overrides", [
    (Pipeline.generate, (), GENERATE_INPUTS, {}),
    (Pipeline.stream, STREAM_EXCLUDED, STREAM_INPUTS, STREAM_DEFAULTS),
])
def test_generate_and_stream_take_every_field_with_its_default(method, exclude, inputs, overrides):
    params = inspect.signature(method).parameters
    names = [f.name for f in _fields(exclude)]
    assert list(params) == ["self", *names, *inputs]  # settings in the type's order, then the inputs
    for f in _fields(exclude):
        expected = overrides.get(f.name, f.default)
        assert params[f.name].default == (inspect.Parameter.empty if expected is dataclasses.MISSING else expected)
        assert f"{f.name}: {f.metadata['doc']}" in method.__doc__  # the docstring documents every setting
    assert STREAM_DEFAULTS == {"ar_step": None, "overlap_history": 17, "overlap_carry": "latent"}


class _StopHere(Exception):
    pass


def _spy_pipeline(monkeypatch) -> tuple[Pipeline, list]:
    """A Pipeline whose _request records the settings it is given and stops the call there."""
    seen = []

    def spy(self, settings, initial=None, given=None, stream=False):
        seen.append(dict(settings))
        raise _StopHere

    monkeypatch.setattr(Pipeline, "_request", spy)
    pipe = Pipeline.__new__(Pipeline)
    pipe.preset = None
    return pipe, seen


def test_generate_and_stream_hand_exactly_the_passed_keywords_to_the_request(monkeypatch):
    pipe, seen = _spy_pipeline(monkeypatch)
    values = {f.name: f"value-{f.name}" for f in SETTINGS}  # distinct markers: each must arrive as given
    with pytest.raises(_StopHere):
        pipe.generate(**values)
    assert seen[-1] == values
    with pytest.raises(_StopHere):
        pipe.stream(**{k: v for k, v in values.items() if k not in STREAM_EXCLUDED})
    assert seen[-1] == {k: v for k, v in values.items() if k not in STREAM_EXCLUDED}
    # Only what was passed: no signature default is filled in, so a value equal to one stays the caller's.
    with pytest.raises(_StopHere):
        pipe.generate("p", shift=DEFAULTS["shift"], causal_block_size=DEFAULTS["causal_block_size"])
    assert seen[-1] == {"prompt": "p", "shift": 8.0, "causal_block_size": 1}
    with pytest.raises(_StopHere):
        pipe.stream("p", ar_step=None)
    assert seen[-1] == {"prompt": "p", "ar_step": None}
    # Positional settings keep working in the type's order, as they did with the written-out signatures.
    with pytest.raises(_StopHere):
        pipe.generate("p", "neg", 17)
    assert seen[-1] == {"prompt": "p", "negative_prompt": "neg", "num_frames": 17}
    with pytest.raises(TypeError, match="steps"):
        pipe.generate("p", steps=3)  # an unknown keyword is refused like any Python call
    with pytest.raises(TypeError, match="num_frames"):
        pipe.stream("p", num_frames=17)
    with pytest.raises(TypeError, match="prompt"):
        pipe.generate(seed=1)  # the prompt is required unless a resolved request is given
    with pytest.raises(_StopHere):
        pipe.generate(request=object())
    assert seen[-1] == {}


def test_every_request_field_builds_a_request():
    # GenerationRequest takes every field by name (the Pipeline builds it from the settings it is given).
    req = GenerationRequest(**{f.name: DEFAULTS.get(f.name, "p") for f in SETTINGS})
    assert [f.name for f in dataclasses.fields(req)] == [f.name for f in SETTINGS]


def _parser_dests(command: str) -> dict:
    from skyrt.runtime.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {a.dest: a for a in sub._actions}


@pytest.mark.parametrize("command, exclude", [("generate", ()), ("serve", STREAM_EXCLUDED)])
def test_the_cli_has_a_flag_for_every_field_that_declares_one(command, exclude):
    actions = _parser_dests(command)
    for f in _fields(exclude):
        if f.metadata["cli"] is None:
            assert f.name not in actions or f.name == "output", f.name  # generate's --output is the mp4 path
            continue
        action = actions[f.name]
        assert f"--{f.metadata['cli']}" in action.option_strings, f.name
        assert f.metadata["doc"] in action.help or f.name == "prompt", f.name
        if f.metadata["choices"] is not None:
            assert tuple(action.choices) == f.metadata["choices"], f.name
        if f.metadata["recommended"]:
            assert action.default is None, f"{f.name}: a model's recommendation must be able to fill it in"


def test_cli_user_settings_are_exactly_the_flags_given(tmp_path):
    from skyrt.runtime.cli import SERVE_DEFAULTS, build_parser, cli_user_settings, serve_sampling
    from skyrt.runtime.resolve import COMMAND_LINE, folder_layers, resolve_request

    parser = build_parser()
    settings, prompt = serve_sampling(parser.parse_args(["serve", "--model", str(tmp_path)]))
    assert settings.user == {} and settings.surface == COMMAND_LINE and settings.command == SERVE_DEFAULTS
    # Flags given with the values of the defaults below them are still the user's.
    settings, _ = serve_sampling(parser.parse_args(["serve", "--steps", "4", "--shift", "8", "--sink-blocks", "1",
                                                    "--image", "a.png"]))
    assert settings.user == {"num_inference_steps": 4, "shift": 8.0, "sink_blocks": 1, "image": "a.png"}
    every_flag = {f.name for f in _fields(STREAM_EXCLUDED) if f.metadata["cli"] is not None}
    argv = ["serve"]
    for f in _fields(STREAM_EXCLUDED):
        if f.metadata["cli"] is not None:
            value = f.metadata["choices"][-1] if f.metadata["choices"] else "1" if f.name != "prompt" else "p"
            argv += [f"--{f.metadata['cli']}", value]
    assert set(cli_user_settings(parser.parse_args(argv))) == every_flag
    # tmp_path: a folder without demo_model.json (a real checkpoint recommends nothing): serve's own small
    # settings over the type's, generate the official T2V settings.
    serve_settings, prompt = serve_sampling(parser.parse_args(["serve", "--model", str(tmp_path)]))
    stream = resolve_request(dataclasses.replace(serve_settings, user={"prompt": prompt.prompt}),
                             folder_layers(tmp_path), stream=True)
    assert {k: getattr(stream.request, k) for k in SERVE_DEFAULTS if k != "overlap_history"} == {
        k: v for k, v in SERVE_DEFAULTS.items() if k != "overlap_history"}
    assert stream.request.overlap_history is None and str(stream.source("overlap_history")).startswith("derived")
    assert stream.request.ar_step == SERVE_DEFAULTS["num_inference_steps"]  # kvcache stream: one block in flight
    clip = resolve_request({"prompt": "p"}, folder_layers(tmp_path))
    assert {k: getattr(clip.request, k) for k in OFFICIAL_T2V} == OFFICIAL_T2V


def test_the_server_accepts_every_stream_setting_and_refuses_others():
    from skyrt.runtime.server.stream_server import StreamServer

    request.check_stream_settings({f.name: DEFAULTS.get(f.name) for f in _fields(STREAM_EXCLUDED + ("prompt",))})
    request.check_stream_settings({"image": None})
    with pytest.raises(ValueError, match="'steps'.*num_inference_steps"):
        StreamServer(None, {"steps": 2})  # the CLI's flag name, not the setting's
    with pytest.raises(ValueError, match="'num_frames'"):
        StreamServer(None, {"num_frames": 97})  # a stream is endless


def test_fleet_stream_keys_are_the_serve_commands_sampling_flags():
    from skyrt.runtime.fleet.config import SERVE_KEYS

    for f in _fields(STREAM_EXCLUDED + ("prompt",)):
        if f.metadata["cli"] is not None:
            key = f.metadata["cli"].replace("-", "_")
            assert key in SERVE_KEYS, f.name
            assert SERVE_KEYS[key] is request.setting_type(f), f.name


def test_a_model_may_recommend_exactly_the_fields_marked_recommended(tmp_path):
    from skyrt.runtime.default_model import SAMPLING_KEYS, recommended_sampling

    recommended = {f.name for f in SETTINGS if f.metadata["recommended"]}
    assert set(SAMPLING_KEYS) == recommended
    values = {f.name: DEFAULTS[f.name] for f in SETTINGS if f.name != "prompt"}
    (tmp_path / "demo_model.json").write_text(json.dumps({"recommended": values}))
    assert set(recommended_sampling(tmp_path)) == recommended
