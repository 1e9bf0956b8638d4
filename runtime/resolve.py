"""One generation request, resolved once at the edge from explicit layers, with where each value came from.

A request's settings come from five layers, each later one overriding the earlier ones:

    default   GenerationRequest's field defaults (a stream's own: Pipeline.stream's, STREAM_DEFAULTS)
    command   the surface's own defaults (`skyrt serve`'s small, fast settings for a model that
              recommends none)
    model     the model folder's recommendation (its demo_model.json)
    preset    a causal family's settings (runtime/causal_family.py: steps, shift, block size, ring, ...)
    user      what the user set: an API keyword, a CLI flag, a fleet YAML key, a server's settings;
              over them, what was set later through the server's HTTP control (PUT /settings)

then `derived` values fill what no layer could know: causal_attention from the checkpoint,
condition_noise and a stream's ar_step by mode, a stream's endless num_frames, no window overlap in
a kvcache stream. Every layer is a mapping of only the keys it sets: "set by the user" is membership
in the user layer, never equality with a default, so `shift=8.0` given to a preset whose shift is 5
runs with 8. What the user sets and the preset cannot honour (4 distilled steps and
num_inference_steps=30, a diffusion-forcing-only setting) is a `LayerConflict` naming both layers and the fix.

`resolve_request` returns a `Resolution`: the frozen, validated GenerationRequest (the one thing that
crosses the server, its generator child process and the pipeline) and the `Source` of every field
(`Resolution.explain()` is what `skyrt generate --explain` prints).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .request import (DEFAULTS, SETTINGS, STREAM_DEFAULTS, STREAM_EXCLUDED, STREAM_FRAMES, GenerationRequest,
                      stream_setting_names, validate_request)

DEFAULT, COMMAND, MODEL, PRESET, USER, DERIVED = "default", "command", "model", "preset", "user", "derived"
LAYERS = (DEFAULT, COMMAND, MODEL, PRESET, USER, DERIVED)  # lowest first

# Where a user's settings came from: how `Source` and errors spell a setting for each surface.
API, COMMAND_LINE, FLEET_YAML, SERVER = "API keyword", "command line", "fleet YAML", "server settings"
HTTP_CONTROL = "HTTP control"  # a running server's PUT/POST /settings (runtime/server/settings_control.py)
_FIELDS = {f.name: f for f in SETTINGS}


def spelled(name: str, surface: str) -> str:
    """A setting as the user wrote it on `surface`: --steps on the command line, steps: in a fleet
    YAML, num_inference_steps= as an API keyword."""
    flag = _FIELDS[name].metadata["cli"] if name in _FIELDS else None
    if surface == COMMAND_LINE and flag is not None:
        return f"--{flag}"
    if surface == FLEET_YAML and flag is not None:
        return f"{flag.replace('-', '_')}:"
    if surface == HTTP_CONTROL:
        return f'/settings "{name}":'
    return f"{name}="


def written(name: str, value, surface: str) -> str:
    """A setting and its value as the user wrote them on `surface` (--steps 30, steps: 30, num_inference_steps=30,
    /settings "num_inference_steps": 30)."""
    spelling = spelled(name, surface)
    if spelling.startswith("--"):
        return f"{spelling} {value}"
    if surface == HTTP_CONTROL:
        return f"{spelling} {json.dumps(value)}"
    return f"{spelling} {value!r}" if spelling.endswith(":") else f"{spelling}{value!r}"


class LayerConflict(ValueError):
    """A value the user set that a lower layer (a preset) cannot honour; the message names both layers."""


@dataclass(frozen=True)
class Source:
    """Which layer a value came from (one of LAYERS) and, in words, which part of it."""

    layer: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.layer} ({self.detail})" if self.detail else self.layer


@dataclass(frozen=True)
class Settings:
    """The settings one surface contributes: `user`, only the keys the user set (on `surface`), and
    the surface's own defaults (`command`, named `command_name`), which rank below the model's
    recommendation. `control`: what the user set later through a running server's HTTP control
    (surface HTTP_CONTROL), the user's too, over `user` key by key."""

    user: Mapping[str, Any] = field(default_factory=dict)
    surface: str = API
    command: Mapping[str, Any] = field(default_factory=dict)
    command_name: str = ""
    control: Mapping[str, Any] = field(default_factory=dict)

    def user_layers(self) -> tuple[tuple[Mapping[str, Any], str], ...]:
        """(values, surface) of what the user set, lowest first."""
        return (self.user, self.surface), (self.control, HTTP_CONTROL)

    @classmethod
    def of(cls, settings: "Settings | Mapping[str, Any] | None") -> "Settings":
        """A Settings as given, or a plain mapping taken as API keywords the user set."""
        if isinstance(settings, Settings):
            return settings
        return cls(user=dict(settings or {}))


@dataclass(frozen=True)
class ModelLayers:
    """What a model brings to a resolution (plain data: the server's generator child sends it to the
    parent, which resolves): its folder's recommendation, its causal preset, and the block size its
    checkpoint was trained with (None: not known, e.g. `--explain` of a folder without config.json)."""

    recommendation: Mapping[str, Any] = field(default_factory=dict)
    recommendation_from: str = ""  # the file it was read from, for Source
    preset: str | None = None  # a name of runtime/causal_family.PRESETS
    checkpoint_block_frames: int | None = None


@dataclass(frozen=True)
class Resolution:
    """A resolved request and the Source of each of its fields."""

    request: GenerationRequest
    sources: Mapping[str, Source]
    stream: bool = False

    def source(self, name: str) -> Source:
        return self.sources[name]

    def set_by_user(self, name: str) -> bool:
        return self.sources[name].layer == USER

    def derive(self, reason: str, **values) -> "Resolution":
        """This resolution with `values` replaced as derived (`reason` says why), validated again."""
        request = replace(self.request, **values)
        validate_request(request)
        return replace(self, request=request, sources={**self.sources, **{k: Source(DERIVED, reason) for k in values}})

    def with_prompt(self, prompt: str, negative_prompt: str | None = None) -> GenerationRequest:
        """The request with a prompt switched from `surface` (a server's POST /prompt or playlist);
        negative_prompt None keeps the request's."""
        if negative_prompt is None:
            return replace(self.request, prompt=prompt)
        return replace(self.request, prompt=prompt, negative_prompt=negative_prompt)

    def explain(self) -> str:
        """Every field, its value and the layer it came from: one line each."""
        rows = [(f.name, _shown(f.name, getattr(self.request, f.name)), str(self.sources[f.name]))
                for f in fields(GenerationRequest)]
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        return "\n".join(f"{name:<{width[0]}}  {value:<{width[1]}}  {source}" for name, value, source in rows)


def _short(path: str) -> str:
    """A recommendation's file as its folder's name and its own (skyrt-demo-world-v6/demo_model.json)."""
    return "/".join(Path(path).parts[-2:]) if path else ""


def _shown(name: str, value) -> str:
    if name == "num_frames" and value == STREAM_FRAMES:
        return "endless"
    return repr(value)


def resolve_request(settings: Settings | Mapping[str, Any] | None = None, model: ModelLayers = ModelLayers(),
                    stream: bool = False) -> Resolution:
    """The frozen, validated GenerationRequest of `settings` over `model`'s layers (module docstring),
    with the Source of every field. stream: a `Pipeline.stream` request (endless; its own defaults)."""
    settings = Settings.of(settings)
    _check_names(settings, stream)
    preset = _preset(model.preset)
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}

    def apply(layer: Mapping[str, Any], source) -> None:
        for key, value in layer.items():
            values[key], sources[key] = value, source(key)

    apply(DEFAULTS, lambda key: Source(DEFAULT))
    if stream:
        apply(STREAM_DEFAULTS, lambda key: Source(DEFAULT, "Pipeline.stream"))
    apply(settings.command, lambda key: Source(COMMAND, settings.command_name))
    apply({k: v for k, v in model.recommendation.items() if k in _FIELDS},
          lambda key: Source(MODEL, _short(model.recommendation_from) or "its recommendation"))
    if preset is not None:
        apply(preset.sampling_defaults(), lambda key: Source(PRESET, preset.name))
        _refuse_what_the_preset_cannot_honour(settings, preset)
    for user, surface in settings.user_layers():
        apply(user, lambda key, surface=surface: Source(USER, spelled(key, surface)))
    _derive(values, sources, settings, model, stream)
    if "prompt" not in values:
        raise ValueError("a request needs a prompt (the text the video shows)")
    request = GenerationRequest(**values)
    validate_request(request)
    return Resolution(request, sources, stream)


def _check_names(settings: Settings, stream: bool) -> None:
    allowed = set(stream_setting_names()) if stream else set(_FIELDS)
    for layer, what in ((settings.user, "setting"), (settings.control, "setting"),
                        (settings.command, f"{settings.command_name} default")):
        unknown = sorted(set(layer) - allowed)
        if unknown:
            endless = " (a stream is endless: it has no num_frames)" if set(unknown) & set(STREAM_EXCLUDED) else ""
            method = "Pipeline.stream" if stream else "Pipeline.generate"
            raise ValueError(f"unknown {what}(s) {', '.join(map(repr, unknown))}{endless}; "
                             f"{method} takes {', '.join(sorted(allowed))}")


def _preset(name: str | None):
    if name is None:
        return None
    from .causal_family import get_preset

    return get_preset(name)


def _refuse_what_the_preset_cannot_honour(settings: Settings, preset) -> None:
    """A user's setting the preset's sampler cannot run is an error naming both layers and the fix."""
    for user, surface in settings.user_layers():
        for key, value in user.items():
            refusal = preset.refusal(key, value)
            if refusal is not None:
                why, fix = refusal
                raise LayerConflict(f"{written(key, value, surface)} (set by the user, {surface}) "
                                    f"conflicts with the {preset.name} preset, which {why}: {fix}")


def _derive(values: dict, sources: dict, settings: Settings, model: ModelLayers, stream: bool) -> None:
    """The values no layer can know; a field a layer set to a real value is left alone."""

    def derived(key: str, value, reason: str) -> None:
        values[key], sources[key] = value, Source(DERIVED, reason)

    mode = values["mode"]
    if values.get("causal_attention") is None:
        blocks = model.checkpoint_block_frames
        if blocks is None:
            derived("causal_attention", None, "from the checkpoint when it loads")
        else:
            derived("causal_attention", blocks > 1, f"the checkpoint's blocks: num_frame_per_block={blocks}")
    if values.get("condition_noise") is None:
        derived("condition_noise", "once" if mode == "kvcache" else "step", f"mode={mode!r}")
    if not stream:
        return
    derived("num_frames", STREAM_FRAMES, "a stream is endless")
    if values.get("ar_step") is None:
        if mode == "kvcache":  # one block in flight at a time: the lowest latency per block
            derived("ar_step", values["num_inference_steps"], "kvcache stream: num_inference_steps")
        else:
            derived("ar_step", 0, "window stream: synchronous")
    if mode == "kvcache" and values.get("overlap_history") is not None:
        # No windows and no input video: the overlap has no effect on a kvcache stream, so its block-alignment
        # checks must not reject one (17 frames = 5 latents fails causal_block_size=2). One the user gave
        # (settings shared with window-mode streams) is shown as not used, not refused.
        given = [written("overlap_history", user["overlap_history"], surface)
                 for user, surface in settings.user_layers() if "overlap_history" in user][-1:]
        derived("overlap_history", None, "a kvcache stream has no windows" +
                "".join(f"; {spelling} is not used" for spelling in given))


def _exported_preset(folder: Path) -> str | None:
    """The preset an ONNX export folder (or an engine folder's copy of its manifest) was made for."""
    for name in ("manifest.json", "onnx_manifest.json"):
        path = folder / name
        if path.is_file():
            try:
                record = json.loads(path.read_text()).get("preset")
            except (OSError, ValueError):
                return None
            return record["name"] if isinstance(record, dict) else None
    return None


def folder_layers(model_dir: str | Path, preset: str | None = None) -> ModelLayers:
    """A model folder's layers read without loading it (json only): its demo_model.json recommendation
    and its config.json's block size. What `skyrt generate --explain` resolves against."""
    from .default_model import DEMO_META, recommended_sampling

    folder = Path(model_dir).expanduser()
    if preset is None:
        preset = _exported_preset(folder)
    recommendation = recommended_sampling(folder) if folder.is_dir() else {}
    blocks = None
    config = folder / "config.json"
    if config.is_file():
        blocks = int(json.loads(config.read_text()).get("num_frame_per_block", 1))
    elif (folder / "model_index.json").is_file():  # diffusers layout
        from .model_folder import inspect_model_folder

        blocks = inspect_model_folder(folder).num_frame_per_block
    return ModelLayers(recommendation, str(folder / DEMO_META) if recommendation else "", preset, blocks)
