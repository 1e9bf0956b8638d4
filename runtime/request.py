"""The one list of generation settings: `GenerationRequest`'s fields, with their types, defaults and docs,
and `validate_request`, the checks every request passes.

Every user of the settings takes them from here instead of spelling them again:
- `Pipeline.generate` / `Pipeline.stream` get their keyword signatures from the fields
  (`with_request_signature`; stream leaves out `num_frames` and changes three defaults) and pass on
  only the keywords a caller gave;
- runtime/resolve.py resolves a request once, at the edge, from explicit layers (these defaults <
  a command's own < the model folder's recommendation < a preset < what the user set), so a value the
  user gives is theirs even when it equals a default here;
- `skyrt generate` / `skyrt serve` build their sampling flags and help from them (`cli_settings`,
  runtime/cli.py; every flag defaults to "not given"), and a fleet stream's YAML keys are those flags
  (runtime/fleet/config.py);
- the server refuses sampling keys that are not stream settings (`check_stream_settings`);
- a model's recommendation (demo_model.json, a causal preset) may set the fields marked `recommended`
  (`RECOMMENDED_KEYS`, runtime/default_model.py).

Each field is declared with `setting(...)`: a one-line doc, the CLI flag (or None: not a flag, and why),
and whether a model may recommend it. tests/test_request.py fails when a field is missing from a user.
"""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

import numpy as np

from . import latents as lat

MODES = ("window", "kvcache")
OUTPUTS = ("frames", "latent")
OVERLAP_CARRIES = ("pixel", "latent")
CONDITION_NOISE = ("step", "once")
SAMPLERS = ("unipc", "euler")
REANCHOR = ("off", "recache")  # runtime/drift.py's policies


def setting(default: Any = MISSING, *, doc: str, cli: str | None, recommended: bool = False,
            choices: tuple[str, ...] | None = None):
    """A GenerationRequest field. doc: one line for docstrings and --help; cli: the flag without its
    dashes, or None for a setting the command line does not take; recommended: a model's
    demo_model.json (or a causal preset) may set it; choices: the values it accepts."""
    meta = {"doc": doc, "cli": cli, "recommended": recommended, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class GenerationRequest:
    """Every generation setting: resolved and validated once at the edge (runtime/resolve.py), then
    frozen; the one thing that crosses the server, its generator child process and the pipeline.

    Two settings default to None and are derived by the resolution: causal_attention (the checkpoint's
    own) and condition_noise (by mode); a stream's ar_step too (by mode)."""

    prompt: str = setting(doc="what the video shows", cli="prompt")
    negative_prompt: str = setting("", doc="what classifier-free guidance steers away from", cli="negative-prompt")
    num_frames: int = setting(97, doc="pixel frames of the clip (window mode: 1 + 4k)", cli="num-frames")
    height: int = setting(544, doc="frame height in pixels (a multiple of 16)", cli="height", recommended=True)
    width: int = setting(960, doc="frame width in pixels (a multiple of 16)", cli="width", recommended=True)
    num_inference_steps: int = setting(30, doc="denoising steps per frame", cli="steps", recommended=True)
    guidance_scale: float = setting(6.0, doc="classifier-free guidance scale (<= 1: no guidance)",
                                    cli="guidance-scale", recommended=True)
    shift: float = setting(8.0, doc="flow-matching timestep shift (8 for T2V, 5 for I2V)", cli="shift",
                           recommended=True)
    ar_step: int = setting(0, doc="asynchronous step offset between causal blocks (0 = synchronous)",
                           cli="ar-step", recommended=True)
    causal_block_size: int = setting(1, doc="latent frames denoised together as one causal block",
                                     cli="causal-block-size", recommended=True)
    base_num_frames: int = setting(97, doc="pixel frames of one window (1 + 4k)", cli="base-num-frames")
    overlap_history: int | None = setting(None, doc="pixel frames each window carries from the previous one "
                                                    "(17 or 37 recommended; None: one window)",
                                          cli="overlap-history")
    addnoise_condition: float = setting(0, doc="noise level of the carried prefix frames, in [0, 1000) "
                                               "(20 recommended for long videos)", cli="addnoise-condition")
    fps: int = setting(24, doc="frame rate of the output (16 selects the 16 fps sample-info class)", cli="fps")
    seed: int | None = setting(None, doc="seed of the initial noise (numpy PCG64; None: random)", cli="seed")
    mode: str = setting("window", doc="window: the official rollout; kvcache: each block denoised once against "
                                      "a ring KV cache", cli="mode", recommended=True, choices=MODES)
    output: str = setting("frames", doc="frames: uint8 video; latent: model-space latents",
                          cli=None, choices=OUTPUTS)  # the CLI always writes a video
    overlap_carry: str = setting("pixel", doc="how windows carry the overlap: pixel (official) or latent (diffusers)",
                                 cli="overlap-carry", choices=OVERLAP_CARRIES)
    sampler: str = setting("unipc", doc="per-frame sampler: unipc (official) or euler", cli=None,
                           choices=SAMPLERS)  # not a flag yet: the official sampler is the one to serve
    causal_attention: bool | None = setting(None, doc="block-causal attention inside a window (None: when the "
                                                      "checkpoint was trained with blocks > 1)", cli=None)
    sink_blocks: int = setting(1, doc="kvcache: blocks kept forever at the ring's start", cli="sink-blocks",
                               recommended=True)
    window_blocks: int = setting(8, doc="kvcache: rolling blocks of history", cli="window-blocks", recommended=True)
    condition_noise: str | None = setting(None, doc="addnoise_condition noise drawn every step (official) or "
                                                    "once per window (None: step in window mode, once in kvcache)",
                                          cli=None, choices=CONDITION_NOISE)  # None is resolved before the check
    reanchor: str = setting("off", doc="what a stream does when its drift monitor crosses a threshold: off (count "
                                       "it) or recache (kvcache: commit the window and sink again under the prompt)",
                            cli="reanchor", choices=REANCHOR)

    @property
    def latent_frames(self) -> int:
        """Latent frames whose decode covers num_frames (window mode's 1 + 4k frames: exactly)."""
        return lat.latents_covering(self.num_frames)

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // lat.SPATIAL_FACTOR, self.width // lat.SPATIAL_FACTOR

    @property
    def use_cfg(self) -> bool:
        # Official: classifier-free guidance only when the scale exceeds 1.
        return self.guidance_scale > 1.0

    @property
    def is_long(self) -> bool:
        return self.overlap_history is not None and self.num_frames > self.base_num_frames


SETTINGS = fields(GenerationRequest)
DEFAULTS: dict[str, Any] = {f.name: f.default for f in SETTINGS if f.default is not MISSING}
# Keys a model's recommendation may set (demo_model.json, a causal preset's sampling defaults).
RECOMMENDED_KEYS = tuple(f.name for f in SETTINGS if f.metadata["recommended"])
# What Pipeline.stream does differently: no clip length (endless), and the defaults of an endless stream.
STREAM_EXCLUDED = ("num_frames",)
STREAM_DEFAULTS = {"ar_step": None, "overlap_history": 17, "overlap_carry": "latent"}
STREAM_FRAMES = 1 + 4 * 2**40  # a stream's num_frames, "forever": it is planned one window at a time


def stream_setting_names() -> tuple[str, ...]:
    """The settings `Pipeline.stream` takes (the server's accepted sampling keys, plus its inputs)."""
    return tuple(f.name for f in SETTINGS if f.name not in STREAM_EXCLUDED)


def setting_type(f) -> type:
    """The plain type of a field (int for `int | None`)."""
    hint = typing.get_type_hints(GenerationRequest)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def cli_settings(exclude: tuple[str, ...] = ()) -> list:
    """The fields the command line takes as flags (`--<metadata cli>`), in declaration order."""
    return [f for f in SETTINGS if f.metadata["cli"] is not None and f.name not in exclude]


def check_stream_settings(sampling: dict, inputs: tuple[str, ...] = ("image",)) -> None:
    """Refuse keys that are not `Pipeline.stream` settings (a typo would otherwise fail in the generator
    thread, after the server started)."""
    unknown = sorted(set(sampling) - set(stream_setting_names()) - set(inputs))
    if unknown:
        raise ValueError(f"unknown sampling setting(s) {', '.join(map(repr, unknown))}; Pipeline.stream takes "
                         f"{', '.join(stream_setting_names())} and {', '.join(inputs)}")


def settings_doc(exclude: tuple[str, ...] = (), defaults: dict | None = None) -> str:
    """The 'Settings' section of a docstring: one line per field, default included."""
    defaults = {**DEFAULTS, **(defaults or {})}
    indent = " " * 8  # a method docstring's body
    lines = [f"{indent}    {f.name}: {f.metadata['doc']} "
             f"({'required' if f.name not in defaults else f'default {defaults[f.name]!r}'})"
             for f in SETTINGS if f.name not in exclude]
    return f"\n\n{indent}Settings (skyrt.runtime.request.GenerationRequest):\n" + "\n".join(lines)


def with_request_signature(exclude: tuple[str, ...] = (), defaults: dict | None = None) -> Callable:
    """Give `method(self, *, <inputs>, **settings)` the public signature `(self, <settings>, *, <inputs>)`:
    the request's fields (less `exclude`, `defaults` overriding theirs) as positional-or-keyword
    parameters, then the method's own keyword-only inputs. The wrapper binds a call against that
    signature (an unknown keyword is a TypeError, as with a written-out signature) and calls the
    method with only the settings the caller passed: the defaults the signature shows are applied by
    the resolution (runtime/resolve.py), so a value passed explicitly stays the caller's even when it
    equals a default. `prompt` is required unless the method's own `request` input is given."""
    overrides = dict(defaults or {})

    def wrap(method: Callable) -> Callable:
        own = [p for p in inspect.signature(method).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        for f in SETTINGS:
            if f.name in exclude:
                continue
            default = overrides.get(f.name, f.default)
            optional = default is None and "None" not in f.type  # stream's ar_step: unset until resolved
            params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=inspect.Parameter.empty if default is MISSING else default,
                                            annotation=f"{f.type} | None" if optional else f.type))
        signature = inspect.Signature(params + own, return_annotation=inspect.signature(method).return_annotation)
        own_names = {p.name for p in own}

        @functools.wraps(method)
        def call(*args, **kwargs):
            values = dict(signature.bind_partial(*args, **kwargs).arguments)  # what the caller passed, no defaults
            self = values.pop("self")
            inputs = {k: values.pop(k) for k in own_names if k in values}
            if inputs.get("request") is None and "prompt" not in values:
                raise TypeError("missing a required argument: 'prompt'")
            return method(self, **inputs, **values)

        call.__signature__ = signature
        call.__doc__ = (method.__doc__ or "").rstrip() + settings_doc(exclude, overrides)
        return call

    return wrap


def validate_request(req: GenerationRequest) -> None:
    """Refuse settings the public implementations would silently mishandle, naming a fix."""
    for f in SETTINGS:  # mode, output, overlap_carry, sampler, condition_noise: the request type's choices
        if f.metadata["choices"] is not None:
            _check_choice(f.name, getattr(req, f.name), f.metadata["choices"])
    if req.mode == "kvcache" and req.condition_noise == "step" and req.addnoise_condition > 0:
        raise ValueError(
            "mode='kvcache' commits the prefix once, so its addnoise_condition noise is drawn once: "
            "condition_noise='step' (the official per-step redraw) needs mode='window'; use condition_noise='once'"
        )
    if req.reanchor != "off" and req.mode != "kvcache":
        raise ValueError(f"reanchor={req.reanchor!r} re-commits a KV cache, which mode={req.mode!r} has none: use "
                         "mode='kvcache', or reanchor='off' (the drift monitor still reports)")
    if not isinstance(req.prompt, str):
        raise ValueError(f"prompt must be a string, got {type(req.prompt).__name__}")
    for name in ("height", "width"):
        value = getattr(req, name)
        unit = lat.SPATIAL_FACTOR * lat.PATCH_SPATIAL
        if value <= 0 or value % unit:
            near = max(unit, round(value / unit) * unit)
            raise ValueError(f"{name}={value} must be a positive multiple of {unit} (VAE 8x, patch 2); try {name}={near}")
    if req.mode == "kvcache":
        # kvcache mode returns any frame count (see Pipeline.generate); window mode keeps 1 + 4k.
        if not isinstance(req.num_frames, (int, np.integer)) or req.num_frames < 1:
            raise ValueError(f"num_frames={req.num_frames!r} must be a positive integer number of frames")
    else:
        _check_pixel_frames("num_frames", req.num_frames)
    _check_pixel_frames("base_num_frames", req.base_num_frames)
    if req.seed is not None and (isinstance(req.seed, bool) or not isinstance(req.seed, (int, np.integer))
                                 or req.seed < 0):
        raise ValueError(f"seed={req.seed!r} must be a non-negative integer (numpy's default_rng), or None for a "
                         "random seed")
    if req.num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={req.num_inference_steps} must be at least 1 (recommended 30)")
    if req.shift <= 0:
        raise ValueError(f"shift={req.shift} must be positive (recommended 8 for T2V, 5 for I2V)")
    if req.ar_step < 0:
        raise ValueError(f"ar_step={req.ar_step} must be >= 0 (0 = synchronous, 5 = the official async setting)")
    if req.causal_block_size < 1:
        raise ValueError(f"causal_block_size={req.causal_block_size} must be >= 1")
    if not 0 <= req.addnoise_condition < 1000:
        raise ValueError(f"addnoise_condition={req.addnoise_condition} must be in [0, 1000); 20 is recommended")
    if req.overlap_history is not None:
        _check_pixel_frames("overlap_history", req.overlap_history)
        if req.overlap_history >= req.base_num_frames:
            raise ValueError(
                f"overlap_history={req.overlap_history} must be smaller than base_num_frames={req.base_num_frames}; "
                "the official recommendation is 17 or 37"
            )
        overlap = lat.latent_length(req.overlap_history)
        if overlap % req.causal_block_size:
            fix = 1 + 4 * (max(1, overlap // req.causal_block_size) * req.causal_block_size - 1)
            raise ValueError(
                f"overlap_history={req.overlap_history} is {overlap} latent frames, not a multiple of "
                f"causal_block_size={req.causal_block_size} (the official code would truncate it); "
                f"try overlap_history={fix}"
            )
    elif req.num_frames > req.base_num_frames and req.mode == "window":
        raise ValueError(
            f"num_frames={req.num_frames} exceeds base_num_frames={req.base_num_frames}: long videos need "
            "overlap_history (17 or 37 recommended), or raise base_num_frames to num_frames"
        )


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _check_pixel_frames(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer number of frames, got {type(value).__name__}")
    if value < 1 or (value - 1) % lat.TEMPORAL_FACTOR:
        near = 1 + lat.TEMPORAL_FACTOR * max(0, round((int(value) - 1) / lat.TEMPORAL_FACTOR))
        raise ValueError(
            f"{name}={value} must be of the form 1 + 4k (the VAE maps 1 + 4k pixel frames to k + 1 latents); "
            f"try {name}={near}"
        )
