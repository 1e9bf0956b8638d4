"""The diffusion-forcing rollout driver (window mode: the official SkyReels-V2 semantics).

One driver for every backend: it owns the noise and the window bookkeeping; the rollout core
(skyrt._core.RolloutCore, csrc/rollout.h) owns the DF schedule, the per-frame samplers, CFG and
addnoise; the backend only runs networks. Shapes: latents are model-space float32
[16, F, h, w] (no batch axis), pixels float32 [3, T, H, W] in [-1, 1], frames uint8 [T, H, W, 3].

Window mode, as in the official `DiffusionForcingPipeline`:
- a clip of `num_frames` pixel frames has L = (num_frames - 1) // 4 + 1 latent frames;
- if it fits in `base_num_frames` (or no overlap is given) it is one window holding all L frames;
- otherwise windows of `base_num_frames` overlap by `overlap_history` frames; each later window
  starts from a prefix carried from the previous one: `pixel` carry (official: decode, take the
  last `overlap_history` pixel frames, re-encode) or `latent` carry (diffusers: reuse the latents);
- inside a window the DF timestep matrix says which frames move at each step; every frame has its
  own UniPC sampler; prefix frames sit at t = 0 (or at `addnoise_condition`, with fresh noise).
  Each window is one rollout core in window mode (RolloutCore.window: the cache recomputed per
  window): every row, every frame of the window goes through the backend's window session step (no
  cached context) and the core steps the updated blocks.

Noise, one draw order (numpy PCG64, so a seed gives the same video on every backend and device):
per window, its initial noise [16, F - end frames, h, w] (unless the caller gave the first window's),
then with addnoise_condition and a prefix the prefix's noise [16, P, h, w]: once for the window
(condition_noise="once"), or before every row (condition_noise="step", official).
"""
from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from skyrt import _core

from . import latents as lat
from .backends.base import Backend, KVStepCall, KVStreamSpec, TextContext
from .drift import DriftMonitor, DriftThresholds
from .request import (STREAM_DEFAULTS, STREAM_EXCLUDED, STREAM_FRAMES, GenerationRequest, validate_request,
                      with_request_signature)
from .resolve import ModelLayers, Resolution, Settings, resolve_request
from .scheduler import flow_sigmas, flow_timesteps
from .stream_start import clip_start, still_clip
from .video_io import ImageLike, VideoLike, load_image, load_video, to_model_pixels, to_uint8_frames

if TYPE_CHECKING:
    from .causal_family import CausalPreset

log = logging.getLogger("skyrt.pipeline")


@dataclass
class Window:
    """One window of the rollout: its latent frame count and where its prefix comes from."""

    index: int
    num_frames: int  # latent frames in the window, prefix and end frames included
    prefix_frames: int = 0
    end_frames: int = 0


@dataclass
class Conditioning:
    """Encoded user inputs: prompt contexts and optional image / video / end-image latents."""

    cond: TextContext
    uncond: TextContext | None
    start_latents: np.ndarray | None = None  # model space [16, P, h, w], first window's prefix
    end_latents: np.ndarray | None = None  # model space [16, E, h, w], pinned after the last window
    input_pixels: np.ndarray | None = None  # V2V: the input video [3, T, H, W], output starts with it
    start_pixel_frames: int = 0  # V2V: the decoded frames of start_latents, replaced by the input video
    rng: np.random.Generator = field(default_factory=np.random.default_rng)


@dataclass
class Rollout:
    """Denoised windows as (latents [16, F, h, w], prefix length) and, with pixel carry, the video."""

    windows: list[tuple[np.ndarray, int]]
    video: np.ndarray | None = None  # [3, T, H, W] stitched like the official pipeline

    def latents(self, include_first_prefix: bool = False) -> np.ndarray:
        """Every window's new latents in order [16, F_total, h, w]."""
        parts = [z if (i == 0 and include_first_prefix) else z[:, p:] for i, (z, p) in enumerate(self.windows)]
        return np.concatenate(parts, axis=1)


def plan_windows(req: GenerationRequest, prefix_frames: int, end_frames: int, v2v: bool) -> list[Window]:
    """The official window plan: sizes of each window in latent frames (see module docstring)."""
    total = req.latent_frames
    if not (req.is_long or v2v):
        # Short video: one window with every frame, whatever base_num_frames says (official).
        return [Window(0, total + end_frames, prefix_frames, end_frames)]
    base = lat.latent_length(req.base_num_frames)
    overlap = lat.latent_length(req.overlap_history)
    n_windows = 1 + (total - base - 1) // (base - overlap) + 1 if total > base else 1
    windows = []
    for i in range(n_windows):
        if i == 0 and not v2v:
            size, prefix = base if req.is_long else total, prefix_frames
        else:
            finished = i * (base - overlap) + overlap
            size, prefix = min(total - finished + overlap, base), overlap
        end = end_frames if i == n_windows - 1 else 0
        windows.append(Window(i, size + end, prefix, end))
    return windows


class Pipeline:
    """SkyReels-V2 diffusion-forcing pipeline over a backend (create it with `skyrt.load`).

    With a causal-family preset (`skyrt.load(folder, preset="self-forcing")`, runtime/causal_family.py)
    generate / stream run that family's own few-step sampler with its KV cache on the rollout core
    (runtime/causal_rollout.py's settings, runtime/kvcache.py's driver),
    always (the preset sets mode="kvcache").

    Settings are resolved once per call (runtime/resolve.py): the request type's defaults < the model
    folder's recommendation (`recommendation`, its demo_model.json) < the preset (steps, shift, block
    size, ring, 480x832, no guidance, 16 fps) < the keywords the caller passed. A keyword passed is the
    caller's even when it equals the signature's default: `shift=8.0` runs with 8 under Self-Forcing's 5.
    What a preset cannot run (num_inference_steps other than its distilled count, mode="window", the
    diffusion-forcing-only ar_step, sampler, overlap_*, base_num_frames, addnoise_condition,
    condition_noise, causal_attention) is refused naming both. `resolve()` gives that resolution
    without running anything; generate / stream also take an already resolved `request=` (what the
    server's generator child receives), which is used as it is.
    """

    def __init__(self, backend: Backend, preset: "CausalPreset | None" = None, recommendation: dict | None = None,
                 recommendation_from: str = ""):
        """recommendation: the model folder's recommended settings (`skyrt.load` reads its demo_model.json),
        read from `recommendation_from` (for a Source's words)."""
        self.backend = backend
        self.model = backend.model
        self.preset = preset
        self.recommendation = dict(recommendation or {})
        self.recommendation_from = recommendation_from

    @property
    def layers(self) -> ModelLayers:
        """What this model brings to a resolution: recommendation, preset, the checkpoint's block size."""
        return ModelLayers(self.recommendation, self.recommendation_from,
                           None if self.preset is None else self.preset.name, self.model.num_frame_per_block)

    def resolve(self, settings: "Settings | dict | None" = None, stream: bool = False) -> Resolution:
        """The request `settings` resolve to on this model (runtime/resolve.py), and where each value
        came from; a plain dict is API keywords the caller set."""
        return resolve_request(settings, self.layers, stream=stream)

    # ------------------------------------------------------------------ public API
    @with_request_signature()
    def generate(self, *, image: ImageLike | None = None, video: VideoLike | None = None,
                 end_image: ImageLike | None = None, latents: np.ndarray | None = None, progress: bool = True,
                 request: GenerationRequest | None = None, **settings) -> np.ndarray:
        """Generate a video.

        Returns uint8 frames [T, H, W, 3] (output="frames") or model-space float32 latents
        [16, F, h, w] before VAE de-normalisation (output="latent"). `latents` is the initial noise
        of the first window [16, F, h, w]; otherwise noise comes from `seed` (numpy PCG64: the same
        seed gives the same video in skyrt, not the same bits as the official torch generator).
        `image` (I2V) is the first frame, `end_image` the last, `video` (V2V) is extended: the
        result then starts with the input video. `overlap_carry` picks how long videos carry the
        overlap between windows: "pixel" (official) or "latent" (diffusers).

        mode="kvcache" denoises each block of `causal_block_size` frames once against a ring KV cache
        of `sink_blocks` + `window_blocks` finished blocks (exact for block-causal checkpoints while
        everything fits in the cache; equals window mode with causal_attention=True and the same noise).
        An image or video prefix enters the cache as committed blocks; an end image needs window mode.
        With a causal preset, `image` / `video` is the start (runtime/stream_start.py): an image as a still
        clip of one block, a clip's last whole blocks; the result starts with the image's still block, or
        with the input video itself (`num_frames` then counts the start's frames too).
        kvcache mode takes any `num_frames` >= 1: it denoises whole blocks of latents that cover the
        clip and returns exactly `num_frames` frames (the causal VAE's first frames do not depend on
        later latents). Window mode keeps the official constraints (1 + 4k frames, whole blocks).

        `condition_noise` is how the `addnoise_condition` noise on prefix frames is drawn: "step"
        (official, fresh at every step; window mode's default) or "once" per window (the only choice
        in kvcache mode, where the prefix is committed once).

        `request`: an already resolved request (`resolve(...).request`) instead of settings.
        """
        self._check_preset_inputs(end_image=end_image)
        req = self._request(settings, latents, given=request)
        cond = self._condition(req, image, video, end_image)
        if req.mode == "kvcache":
            return self._generate_kvcache(req, cond, latents, progress)
        windows = self._plan(req, cond)
        rollout = self._rollout(req, cond, windows, initial_noise=latents, progress=progress)
        if req.output == "latent":
            # The latents whose decode is the video: V2V leaves out the input's re-encoded tail.
            return rollout.latents(include_first_prefix=cond.input_pixels is None)
        return self._decode(req, cond, rollout)

    @with_request_signature(exclude=STREAM_EXCLUDED, defaults=STREAM_DEFAULTS)
    def stream(self, *, image: ImageLike | None = None, video: VideoLike | None = None, max_chunks: int | None = None,
               request: GenerationRequest | None = None, resume=None,
               drift: DriftThresholds | None = None, **settings) -> FrameStream:
        """An endless stream: iterate it for uint8 frame chunks [n, H, W, 3] (or, with output="latent",
        model-space latent chunks [16, f, h, w]) forever, or for `max_chunks` chunks.

        A chunk is a window in window mode and a block of `causal_block_size` latent frames in
        kvcache mode. `ar_step` left unset is 0 (synchronous) in window mode and, in kvcache mode,
        `num_inference_steps`: one block in flight at a time, the lowest latency per block (an endless
        kvcache stream needs ar_step >= 1; 0 given explicitly is refused); a kvcache stream has no windows,
        so it uses no overlap_history (one given is shown as not used). `stream.set_prompt(...)` switches the
        prompt at the next chunk, from any thread; in kvcache mode `recache=True` also re-commits the
        cached blocks under the new prompt.

        Window mode with overlap: every window after the first adds base - overlap latent frames.
        With the default latent carry, frames go through the streaming VAE decoder, so the
        concatenated stream equals a whole decode of all latents.

        `image` starts the stream from a first frame; with a causal preset, `image` or `video` (a short
        clip) is committed into the cache as whole clean blocks (runtime/stream_start.py) and the stream's
        first chunks are their decode. A diffusion-forcing stream takes `image` only.

        `request`: an already resolved stream request (`resolve(..., stream=True).request`) instead of
        settings (what `skyrt serve` hands its generator process).

        `resume`: a checked runtime.snapshot.Snapshot of a kvcache stream of this request and model; the
        stream continues where that one stood (the same blocks an uninterrupted stream would give next).
        `stream.export_state()` gives (state, arrays) for such a snapshot, between chunks.
        Every stream runs a drift monitor (runtime/drift.py; `drift` sets its thresholds, default
        DriftThresholds()) on each chunk's latents and frames: `stream.drift_status()` reads it. With
        reanchor="recache" (kvcache mode) a crossing re-anchors the cache (KVRollout.recache) between
        blocks; reanchor="off" only counts crossings and leaves the stream as it is.
        """
        if video is not None and self.preset is None:
            raise ValueError("video= starts a stream only under a causal preset (skyrt.load(..., preset=...)); a "
                             "diffusion-forcing stream takes image=, and generate(video=...) extends a video")
        # A stream is a long video of unbounded length (num_frames "forever"): windows are planned one at a time.
        req = self._request(settings, given=request, stream=True)
        cond = self._condition(req, image, video, None)
        control = StreamControl(req.prompt, req.negative_prompt)
        if resume is not None and req.mode != "kvcache":
            raise ValueError("only kvcache streams resume from a snapshot; window mode starts fresh")
        monitor = DriftMonitor(drift, req.reanchor)
        chunks = self._stream_kvcache(req, cond, control, monitor, resume) if req.mode == "kvcache" else (
            self._stream_windows(req, cond, control, monitor))
        return FrameStream(chunks, control, max_chunks, monitor)

    def _stream_windows(self, req, cond, control: "StreamControl", monitor: DriftMonitor) -> Iterator[np.ndarray]:
        base = lat.latent_length(req.base_num_frames)
        decoder = self.backend.streaming_decoder()
        prefix = cond.start_latents
        index = 0
        while True:
            switch = control.take()
            if switch is not None:  # the next window follows the new prompt; the overlap keeps continuity
                cond.cond, cond.uncond = self._encode_prompts(req, switch)
            window = Window(index, base, 0 if prefix is None else prefix.shape[1])
            z = self._denoise_window(req, cond, window, prefix, None)
            new = z if index == 0 else z[:, window.prefix_frames :]
            if req.overlap_carry == "latent":
                # Streaming decode of each new latent frame == one decode of the whole stream.
                frames = None if req.output == "latent" else to_uint8_frames(self._decode_stream(decoder, new))
                prefix = self._next_prefix(req, z, None)
            else:
                pixels = self.backend.vae_decode(lat.denormalize(z))
                frames = None if req.output == "latent" else to_uint8_frames(
                    pixels if index == 0 else pixels[:, req.overlap_history :])
                prefix = self._encode_pixels(pixels[:, -req.overlap_history :])
            monitor.observe(new, frames)  # window mode has no cache to re-anchor (reanchor="off" enforced)
            yield new if frames is None else frames
            index += 1

    def _decode_stream(self, decoder, z: np.ndarray) -> np.ndarray:
        """Model-space latents [16, f, h, w] -> pixels [3, n, H, W] through a streaming decoder."""
        return np.concatenate([decoder.decode_next(lat.denormalize(z[:, i : i + 1])) for i in range(z.shape[1])],
                              axis=1)

    def _encode_prompts(self, req, switch: "PromptSwitch"):
        """(cond, uncond) TextContexts of a prompt switch; uncond only with classifier-free guidance."""
        negative = req.negative_prompt if switch.negative_prompt is None else switch.negative_prompt
        cond = self.backend.encode_text(switch.prompt)
        return cond, (self.backend.encode_text(negative) if req.use_cfg else None)

    # ------------------------------------------------------------------ kvcache mode
    def _kv_rollout(self, req, cond, horizon_blocks, noise):
        """The one rollout engine (runtime/kvcache.py on skyrt._core.RolloutCore): the DF kvcache mode, or
        with a preset the causal family's sampling (runtime/causal_rollout.py)."""
        from . import kvcache

        settings = kvcache.KVSettings(req.sink_blocks, req.window_blocks)
        if self.preset is not None:
            return kvcache.KVRollout(self.backend, req, cond.cond, cond.uncond, cond.rng, settings, horizon_blocks,
                                     prefix=cond.start_latents, noise=noise, sampling=self._causal_rollout(req))
        if cond.end_latents is not None:
            raise ValueError("mode='kvcache' cannot pin an end image: block-causal attention never lets earlier "
                             "frames see it; use mode='window' for end_image")
        if not req.causal_attention:
            warnings.warn("this checkpoint was trained with bidirectional attention: mode='kvcache' approximates "
                          "the window mode (exact only for block-causal checkpoints)", stacklevel=3)
        return kvcache.KVRollout(self.backend, req, cond.cond, cond.uncond, cond.rng, settings, horizon_blocks,
                                 prefix=cond.start_latents, noise=noise)

    def _causal_rollout(self, req):
        """The preset family's sampler and cache rules in the rollout core's terms (runtime/causal_rollout.py)."""
        from .causal_rollout import rollout_sampling

        return rollout_sampling(self.preset.sampling, shift=req.shift, rolling_cache=self.preset.rolling_cache)

    # ------------------------------------------------------------------ causal-family presets
    def _check_preset_inputs(self, **inputs) -> None:
        if self.preset is None:
            return
        given = [name for name, value in inputs.items() if value is not None]
        if given:
            raise ValueError(f"the {self.preset.name} preset cannot take {', '.join(given)}: block-causal attention "
                             "never lets earlier frames see an end frame; a preset starts from image= or video=")

    def _validate_preset(self, req: GenerationRequest) -> None:
        """A request resolved elsewhere must still be one this preset's checkpoint can run (a resolution
        over this model's layers refuses the rest earlier, naming the user's setting and the preset)."""
        for key in ("mode", "num_inference_steps"):
            refusal = self.preset.refusal(key, getattr(req, key))
            if refusal is not None:
                raise ValueError(f"the request's {key}={getattr(req, key)!r} cannot run on the {self.preset.name} "
                                 f"preset, which {refusal[0]}: resolve it with this pipeline (Pipeline.resolve)")

    def _generate_kvcache(self, req, cond, noise, progress) -> np.ndarray:
        from tqdm.auto import tqdm

        total = req.latent_frames
        # Whole blocks only: a clip whose latents do not split into blocks gets one more partial block's
        # worth of frames, denoised and dropped (block-causal: earlier blocks never see it).
        blocks_needed = -(-total // req.causal_block_size)
        if blocks_needed * req.causal_block_size != total:
            log.debug("kvcache: %d latent frames denoised as %d blocks of %d; the last %d dropped", total,
                      blocks_needed, req.causal_block_size, blocks_needed * req.causal_block_size - total)
        if noise is None:  # one draw for the whole clip, exactly as window mode draws it
            shape = (lat.LATENT_CHANNELS, blocks_needed * req.causal_block_size, *req.latent_size)
            noise = cond.rng.standard_normal(shape, dtype=np.float32)
        with self._kv_rollout(req, cond, blocks_needed, noise) as rollout:  # releases the core's buffers
            blocks = list(tqdm(rollout.blocks(), total=blocks_needed, desc="generate", unit="block",
                               disable=not progress))
        z = np.concatenate(blocks, axis=1)[:, :total]  # [16, total, h, w], the prefix included
        prefix = 0 if cond.start_latents is None else cond.start_latents.shape[1]
        if req.output == "latent":
            # V2V, as in window mode: latents leave out the input's re-encoded tail.
            return z if cond.input_pixels is None else z[:, prefix:]
        pixels = self.backend.vae_decode(lat.denormalize(z))[:, : req.num_frames]  # exactly the frames asked for
        if cond.input_pixels is None:
            return to_uint8_frames(pixels)
        # V2V: frames start with the input video itself (the decode of the prefix only warms the VAE's
        # causal caches).
        return to_uint8_frames(np.concatenate([cond.input_pixels, pixels[:, cond.start_pixel_frames :]], axis=1))

    def _stream_kvcache(self, req, cond, control: "StreamControl", monitor: DriftMonitor,
                        resume=None) -> Iterator[np.ndarray]:
        decoder = self.backend.streaming_decoder()
        rollout = self._kv_rollout(req, cond, None, None)
        try:
            # blocks yielded; whether the monitor asked to re-anchor after the last one (done when the
            # generator resumes, so a snapshot taken while it is suspended must carry it)
            position = {"blocks": 0, "reanchor_pending": False}
            if resume is not None:
                position["blocks"] = self._resume_stream(req, rollout, decoder, monitor, control, resume)
                if resume.state.get("reanchor_pending"):
                    self._between_blocks(req, rollout, monitor, control, reanchor=True)
            # Between blocks (where the generator is suspended) the whole stream state is consistent.
            control.exporter = lambda: self._export_stream(rollout, decoder, monitor, control, position)
            for block in rollout.blocks():
                position["blocks"] += 1
                frames = None if req.output == "latent" else to_uint8_frames(self._decode_stream(decoder, block))
                position["reanchor_pending"] = monitor.observe(block, frames)
                yield block if frames is None else frames
                # the generator resumes here: between blocks, before the next row
                self._between_blocks(req, rollout, monitor, control, position["reanchor_pending"])
                position["reanchor_pending"] = False
        finally:  # close() of the stream (or an error) releases the core's and the backend's buffers at once
            control.exporter = None
            rollout.close()
            decoder.close()

    def _between_blocks(self, req, rollout, monitor: DriftMonitor, control: "StreamControl", reanchor: bool) -> None:
        """After a block: a prompt switch asked for meanwhile, else the monitor's re-anchor (a switch's
        recache already re-anchors under the new prompt)."""
        switch = control.take()
        if switch is not None:
            rollout.set_prompt(*self._encode_prompts(req, switch), recache=switch.recache)
        elif reanchor:
            rollout.recache()
        if reanchor:
            monitor.reanchored()

    @staticmethod
    def _export_stream(rollout, decoder, monitor: DriftMonitor, control: "StreamControl",
                       position: dict) -> tuple[dict, dict]:
        """(state, arrays) of a kvcache stream between blocks (runtime/snapshot.py writes them)."""
        state, arrays = rollout.export_state()
        decoder_arrays = decoder.export_state()
        arrays.update({f"decoder/{k}": v for k, v in decoder_arrays.items()})
        drift_state, drift_arrays = monitor.export_state()
        arrays.update({f"drift/{k}": v for k, v in drift_arrays.items()})
        state.update(blocks=position["blocks"], reanchor_pending=position["reanchor_pending"], prompt=control.prompt,
                     negative_prompt=control.negative_prompt, drift=drift_state)
        return state, arrays

    def _resume_stream(self, req, rollout, decoder, monitor: DriftMonitor, control: "StreamControl", snapshot) -> int:
        """Put a snapshot's state into a fresh stream (runtime/snapshot.py checked the file); returns the
        blocks the saved stream had yielded. The prompt contexts are encoded again and must equal the
        saved ones: a text encoder that gives other contexts is a refusal, not a silently other stream."""
        state, arrays = snapshot.state, snapshot.arrays
        prompts = state["prompts"]
        contexts = [self.backend.encode_text(p) for p in prompts]
        for i, context in enumerate(contexts):
            saved = arrays.get(f"context/{i}")
            value = np.asarray(context.value.detach().cpu().numpy() if hasattr(context.value, "detach")
                               else context.value)
            if saved is None or saved.shape != value.shape or not np.array_equal(saved, value):
                raise ValueError(f"the snapshot's prompt context {i} ({prompts[i][:40]!r}) differs from what "
                                 "this text encoder gives: another encoder or model; start fresh")
        rollout.import_state(state, arrays, contexts)
        decoder.import_state({k[len("decoder/"):]: v for k, v in arrays.items() if k.startswith("decoder/")})
        if "drift" in state:  # snapshots written before the monitor was saved resume with a fresh one
            monitor.import_state(state["drift"], {k[len("drift/"):]: v for k, v in arrays.items()
                                                  if k.startswith("drift/")})
        control.prompt, control.negative_prompt = state["prompt"], state["negative_prompt"]
        if (req.prompt, req.negative_prompt) != (state["prompt"], state["negative_prompt"]):
            # The prompt asked for now (a server's control state saved after the snapshot) takes over at the
            # next block, as a switch would have; the same prompt keeps the stream exactly as it was.
            control.request(PromptSwitch(req.prompt, req.negative_prompt))
        return int(state["blocks"])

    # ------------------------------------------------------------------ validation
    def _request(self, settings: dict, initial: np.ndarray | None = None, given: GenerationRequest | None = None,
                 stream: bool = False) -> GenerationRequest:
        """The request of one call: `given` (already resolved elsewhere: checked, never re-resolved), else
        `settings` (the keywords the caller passed) resolved over this model's layers. `initial` is
        generate's `latents` (the first window's noise), checked against the request's shape."""
        if given is not None:
            if settings:
                raise TypeError(f"pass either request= or settings, not both (got {', '.join(sorted(settings))})")
            req = self._given_request(given, stream)
        else:
            req = self.resolve(settings, stream=stream).request
        if initial is not None:
            expected = self._first_window_frames(req)
            shape = (lat.LATENT_CHANNELS, expected, *req.latent_size)
            if not isinstance(initial, np.ndarray) or initial.shape != shape:
                got = getattr(initial, "shape", type(initial).__name__)
                raise ValueError(f"latents must be the first window's noise, float32 {shape}; got {got}")
        return req

    def _given_request(self, req, stream: bool) -> GenerationRequest:
        if not isinstance(req, GenerationRequest):
            raise TypeError(f"request must be a GenerationRequest (Pipeline.resolve(...).request), got "
                            f"{type(req).__name__}")
        if (req.num_frames == STREAM_FRAMES) != stream:
            raise ValueError("stream() takes a stream's request (resolve(..., stream=True)), not a clip's" if stream
                             else "generate() takes a clip's request (resolve(...)), not a stream's")
        validate_request(req)
        if self.preset is not None:
            self._validate_preset(req)
        return req

    def _first_window_frames(self, req: GenerationRequest) -> int:
        """Latent frames of the first window's noise (kvcache mode: the whole clip)."""
        return lat.latent_length(req.base_num_frames) if req.is_long and req.mode == "window" else req.latent_frames

    # ------------------------------------------------------------------ conditioning
    def _condition(self, req, image, video, end_image) -> Conditioning:
        cond = self.backend.encode_text(req.prompt)
        uncond = self.backend.encode_text(req.negative_prompt) if req.use_cfg else None
        out = Conditioning(cond=cond, uncond=uncond, rng=np.random.default_rng(req.seed))
        if image is not None and video is not None:
            raise ValueError("pass either image (I2V) or video (V2V), not both")
        if self.preset is not None:
            return self._preset_start(req, image, video, out)
        if image is not None:
            out.start_latents = self._encode_image(image, req)
        if end_image is not None:
            out.end_latents = self._encode_image(end_image, req)
        if video is not None:
            if req.overlap_history is None:
                raise ValueError("video extension (V2V) needs overlap_history, e.g. overlap_history=17")
            frames = load_video(video, req.width, req.height)
            if len(frames) < req.overlap_history:
                raise ValueError(
                    f"the input video has {len(frames)} frames, fewer than overlap_history={req.overlap_history}; "
                    f"use overlap_history <= {len(frames)} (of the form 1 + 4k)"
                )
            out.input_pixels = to_model_pixels(frames)
            out.start_latents = self._encode_pixels(out.input_pixels[:, -req.overlap_history :])
            out.start_pixel_frames = req.overlap_history
        for name, value in (("image", out.start_latents), ("end_image", out.end_latents)):
            if value is not None and value.shape[1] % req.causal_block_size:
                raise ValueError(
                    f"the {name} conditioning is {value.shape[1]} latent frame(s), not a multiple of "
                    f"causal_block_size={req.causal_block_size} (the official code would silently drop it); "
                    "use causal_block_size=1 for image conditioning"
                )
        return out

    def _preset_start(self, req, image, video, out: Conditioning) -> Conditioning:
        """A causal preset's start (runtime/stream_start.py): the image as a still clip of one block, or the
        clip's last frames as whole blocks (as many as the ring holds), encoded by the Wan VAE into
        start_latents [16, m b, h, w]. With a video the output starts with the input video itself."""
        block = req.causal_block_size
        if image is not None:
            frames = still_clip(load_image(image, req.width, req.height), block)
        elif video is not None:
            clip = load_video(video, req.width, req.height)
            out.input_pixels = to_model_pixels(clip)
            frames = clip_start(clip, block, self._start_blocks_cap(req))
            out.start_pixel_frames = len(frames)
        else:
            return out
        out.start_latents = self._encode_pixels(to_model_pixels(frames))
        start = out.start_latents.shape[1]
        if req.latent_frames <= start:
            raise ValueError(f"num_frames={req.num_frames} leaves nothing to generate after the start, which fills "
                             f"the first {len(frames)} frames ({start} latent frames); ask for more frames, e.g. "
                             f"num_frames={len(frames) + 4 * 4 * block}")
        return out

    def _start_blocks_cap(self, req) -> int:
        """The most start blocks a preset's stream commits: what its ring holds and, for a sampling with
        several blocks in flight (Rolling-Forcing's window), what the window holds."""
        sampling = self._causal_rollout(req)
        steps, ar_step = sampling.num_steps, sampling.ar_step or req.ar_step
        ring = req.sink_blocks + req.window_blocks
        return ring if ar_step >= steps else min(ring, -(-steps // ar_step))

    def _encode_image(self, image: ImageLike, req: GenerationRequest) -> np.ndarray:
        frame = load_image(image, req.width, req.height)[None]  # [1, H, W, 3]
        return self._encode_pixels(to_model_pixels(frame))

    def _encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels [3, T, H, W] -> model-space latents [16, F, h, w]."""
        return lat.normalize(self.backend.vae_encode(pixels))

    # ------------------------------------------------------------------ rollout
    def _plan(self, req: GenerationRequest, cond: Conditioning) -> list[Window]:
        prefix = 0 if cond.start_latents is None else cond.start_latents.shape[1]
        end = 0 if cond.end_latents is None else cond.end_latents.shape[1]
        windows = plan_windows(req, prefix, end, v2v=cond.input_pixels is not None)
        for w in windows:
            check_block_alignment(req, w)
        return windows

    def _rollout(self, req, cond, windows, initial_noise, progress) -> "Rollout":
        """Denoise every window in order, carrying the overlap from one window to the next."""
        from tqdm.auto import tqdm

        template = timestep_template(req)
        rows = sum(window_rows(req, w, template) for w in windows)
        bar = tqdm(total=rows, desc="generate", unit="step", disable=not progress)
        out = Rollout(windows=[], video=cond.input_pixels)
        prefix = cond.start_latents
        for w in windows:
            noise = initial_noise if w.index == 0 else None
            z = self._denoise_window(req, cond, w, prefix, noise, bar)
            body = z[:, : z.shape[1] - w.end_frames]  # end-image latents are not part of the video
            out.windows.append((body, w.prefix_frames))
            is_last = w.index + 1 == len(windows)
            if req.overlap_carry == "pixel" and (not is_last or req.output == "frames"):
                out.video = self._stitch(req, out.video, body)
            if not is_last:
                prefix = self._next_prefix(req, body, out.video)
        bar.close()
        return out

    def _stitch(self, req, video, body):
        """Pixel carry (official): decode the window, append what follows the overlap."""
        pixels = self.backend.vae_decode(lat.denormalize(body))
        return pixels if video is None else np.concatenate([video, pixels[:, req.overlap_history :]], axis=1)

    def _next_prefix(self, req, body, video):
        """The next window's prefix [16, overlap, h, w]: reused latents, or the re-encoded video tail."""
        if req.overlap_carry == "latent":
            return body[:, -lat.latent_length(req.overlap_history) :]
        return self._encode_pixels(video[:, -req.overlap_history :])

    def _denoise_window(self, req, cond, w: Window, prefix, noise, bar=None) -> np.ndarray:
        """Run the DF schedule over one window on the rollout core; returns its model-space latents
        [16, F, h, w]. Noise is drawn in the module docstring's order."""
        z = self._initial_window(req, cond, w, prefix, noise)
        contexts = [c for c in (cond.cond, cond.uncond if req.use_cfg else None) if c is not None]
        noised = req.addnoise_condition > 0 and w.prefix_frames > 0
        session, core = self._open_window(req, w, contexts, noised)
        try:
            core.load_window(z)
            if noised and req.condition_noise == "once":
                core.set_condition_noise(self._condition_noise(req, cond, w))
            while core.next_row() is not None:
                if noised and req.condition_noise == "step":  # official: fresh noise on the prefix every row
                    core.set_condition_noise(self._condition_noise(req, cond, w))
                frames = core.pack_window()
                session.step(KVStepCall(frames=frames, timesteps=core.window_timesteps, position=0,
                                        slot_valid=np.zeros(0, bool)))
                core.apply_velocity()
                if bar is not None:
                    bar.update(1)
            return core.read_window()
        finally:  # the window's buffers go at once, not when collected
            session.close()
            core.close()

    @staticmethod
    def _initial_window(req, cond, w: Window, prefix, noise) -> np.ndarray:
        """The window's latents before its first row [16, F, h, w]: noise, the prefix in front, the end
        image's latents appended."""
        if noise is None:
            shape = (lat.LATENT_CHANNELS, w.num_frames - w.end_frames, *req.latent_size)
            noise = cond.rng.standard_normal(shape, dtype=np.float32)
        z = np.array(noise, dtype=np.float32, copy=True)
        if w.prefix_frames:
            z[:, : w.prefix_frames] = prefix[:, : w.prefix_frames]
        if w.end_frames:
            z = np.concatenate([z, cond.end_latents], axis=1)
        return z

    @staticmethod
    def _condition_noise(req, cond, w: Window) -> np.ndarray:
        """One draw of addnoise_condition's noise for the window's prefix [16, P, h, w]."""
        return cond.rng.standard_normal((lat.LATENT_CHANNELS, w.prefix_frames, *req.latent_size), dtype=np.float32)

    def _open_window(self, req, w: Window, contexts: list, noised: bool):
        """(the backend's window session, the window-mode core on the session's device), bound, prompts set."""
        b, (h, wd) = req.causal_block_size, req.latent_size
        fps_class = (0 if req.fps == 16 else 1) if self.model.inject_sample_info else None
        layers, heads, head_dim = _attention_layout(self.model)
        spec = KVStreamSpec(contexts=len(contexts), causal_block_size=b, max_frames=w.num_frames, slots=0,
                            latent_size=(h, wd), layers=layers, heads=heads, head_dim=head_dim, fps_class=fps_class,
                            block_causal=bool(req.causal_attention))
        session = self.backend.open_kv_stream(spec)  # slots 0: a window step, no cached context
        try:
            core = _core.RolloutCore.window(
                timestep_template(req), flow_sigmas(req.num_inference_steps, req.shift).astype(np.float64).tolist(),
                sampler=req.sampler, official_df_aliasing=True, ar_step=req.ar_step, causal_block_size=b,
                prefix_blocks=w.prefix_frames // b, window_blocks=w.num_frames // b, end_blocks=w.end_frames // b,
                addnoise_condition=float(req.addnoise_condition) if noised else 0.0, channels=lat.LATENT_CHANNELS,
                height=h, width=wd, contexts=len(contexts), guidance_scale=float(req.guidance_scale),
                device=session.device, stream=session.stream)
            session.bind(core)
            session.set_prompts(contexts)
        except BaseException:
            session.close()
            raise
        return session, core

    # ------------------------------------------------------------------ decoding
    def _decode(self, req, cond: Conditioning, rollout: "Rollout") -> np.ndarray:
        """Rollout -> uint8 frames [T, H, W, 3] with the chosen overlap carry."""
        if req.overlap_carry == "pixel":
            return to_uint8_frames(rollout.video)
        # Latent carry (diffusers): one decode of the first window plus every window's new latents,
        # so the VAE sees one continuous latent sequence.
        pixels = self.backend.vae_decode(lat.denormalize(rollout.latents(include_first_prefix=True)))
        if cond.input_pixels is not None:
            # V2V: the first window's prefix re-decodes the input video's tail; keep the input instead.
            first_prefix = lat.pixel_length(rollout.windows[0][1])
            pixels = np.concatenate([cond.input_pixels, pixels[:, first_prefix:]], axis=1)
        return to_uint8_frames(pixels)


def timestep_template(req: GenerationRequest) -> np.ndarray:
    """The official DF step template: the sampler's int64 timesteps for (num_inference_steps, shift)."""
    return flow_timesteps(req.num_inference_steps, req.shift)


def window_rows(req: GenerationRequest, w: Window, template: np.ndarray) -> int:
    """Schedule rows (DiT steps) of one window: the official DF matrix's, end frames included."""
    step_matrix = _core.df_timestep_matrix(w.num_frames, template, w.num_frames, req.ar_step, w.prefix_frames,
                                           req.causal_block_size)[0]
    return len(step_matrix)


def _attention_layout(model) -> tuple[int, int, int]:
    """(layers, heads, head_dim) of the DiT's self-attention from the model's official config."""
    cfg = model.dit_config
    layers, heads = int(cfg.get("num_layers", 1)), int(cfg.get("num_heads", 1))
    return layers, heads, int(cfg.get("dim", 2 * heads)) // heads


def check_block_alignment(req: GenerationRequest, w: Window) -> None:
    """Every window's latent frames must split into whole causal blocks (else frames stay noise)."""
    b = req.causal_block_size
    if w.num_frames % b == 0:
        return
    body = w.num_frames - w.end_frames
    good = [n for n in range(max(1, body - 2 * b), body + 2 * b + 1) if (n + w.end_frames) % b == 0]
    suggestion = min(good, key=lambda n: abs(n - body))
    raise ValueError(
        f"window {w.index} has {w.num_frames} latent frames, not divisible by causal_block_size={b}: "
        f"the official code would leave the last {w.num_frames % b} frame(s) as noise. Use a frame count "
        f"whose latent length works, e.g. num_frames={lat.pixel_length(suggestion)} for a single window, "
        f"or causal_block_size=1"
    )


@dataclass(frozen=True)
class PromptSwitch:
    """A requested prompt change; negative_prompt None keeps the current one."""

    prompt: str
    negative_prompt: str | None = None
    recache: bool = False


class StreamControl:
    """Thread-safe mailbox between whoever steers a stream and the thread that runs it."""

    def __init__(self, prompt: str, negative_prompt: str):
        self._lock = threading.Lock()
        self._pending: PromptSwitch | None = None
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.exporter = None  # a kvcache stream's export_state, set while it runs

    def request(self, switch: PromptSwitch) -> None:
        with self._lock:
            self._pending = switch  # the latest request wins

    def take(self) -> PromptSwitch | None:
        """The pending switch, now in effect (or None)."""
        with self._lock:
            switch, self._pending = self._pending, None
            if switch is not None:
                self.prompt = switch.prompt
                if switch.negative_prompt is not None:
                    self.negative_prompt = switch.negative_prompt
            return switch


class FrameStream(Iterator[np.ndarray]):
    """What `Pipeline.stream` returns: an iterator of chunks that can be steered while it runs."""

    def __init__(self, chunks: Iterator[np.ndarray], control: StreamControl, max_chunks: int | None,
                 monitor: DriftMonitor | None = None):
        self._chunks, self._control, self._left = chunks, control, max_chunks
        self.monitor = monitor

    def __iter__(self) -> "FrameStream":
        return self

    def __next__(self) -> np.ndarray:
        if self._left is not None:
            if self._left <= 0:
                self.close()
                raise StopIteration
            self._left -= 1
        return next(self._chunks)

    def set_prompt(self, prompt: str, negative_prompt: str | None = None, recache: bool = False) -> None:
        """Switch the prompt from the next chunk on (callable from any thread). In kvcache mode,
        `recache=True` re-commits the cached blocks under the new prompt (a clean pass each), so the
        new prompt takes hold at once instead of blending in as the window rolls over."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
        self._control.request(PromptSwitch(prompt, negative_prompt, bool(recache)))

    @property
    def prompt(self) -> str:
        """The prompt the stream is denoising with now."""
        return self._control.prompt

    def export_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(state, arrays) of the stream between chunks, for runtime/snapshot.py: the rollout core, noise
        generator, prompt contexts, streaming decoder and position (kvcache streams only; call it from
        the thread that iterates, between chunks)."""
        if self._control.exporter is None:
            raise ValueError("this stream has no resumable state (window mode, or not started or closed): "
                             "only a running kvcache stream snapshots")
        return self._control.exporter()

    def drift_status(self) -> dict | None:
        """The drift monitor's figures (runtime/drift.py DriftMonitor.status), JSON-safe; None without one."""
        return None if self.monitor is None else self.monitor.status()

    def close(self) -> None:
        """Stop the stream and release its state."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
