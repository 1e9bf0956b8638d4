"""The KV-cached rollout: mode="kvcache" and every causal-family preset; each block is denoised once, forever.

Blocks of `causal_block_size` latent frames follow the official DF schedule (skyrt._core.DFSchedule,
streamed row by row). Only blocks that are being denoised are run through the DiT; finished blocks
live in a ring KV cache (skyrt._core.KVRing: `sink_blocks` kept forever plus a rolling window of
`window_blocks`) and are never recomputed. When a block finishes, a clean pass at t = 0 writes its
K/V into the cache ("commit"). When positions approach the model's 1024-entry RoPE table, the
cache is rebased: cached keys are rotated by minus the shift (temporal part only), so the stream
never hits the wall.

Exact for block-causal checkpoints while every block fits in the cache: a block-causal full forward
gives block j the same K/V whether earlier blocks are recomputed at t = 0 (window mode) or cached
at commit. For bidirectional checkpoints (the released SkyReels-V2 DF weights) it approximates the
window mode, and the pipeline warns.

Where the state lives: in skyrt._core.RolloutCore, on the device the backend's stream session names
(host memory for the CPU backends, the GPU for torch-CUDA / ORT-CUDA / TensorRT): latents of the
blocks in flight, their per-frame sampler history (UniPC with the official DF aliasing, or Euler),
the ring K/V of every prompt context [layers, B, slots * tokens_per_block, heads, head_dim], CFG and
addnoise, all allocated once per stream and released by close(). This module drives it once per
schedule row (and once per block commit): it draws the noise (numpy PCG64, so a seed gives the same
stream on every device), decides rebases and hands the step to the backend's KVStreamSession.
tests/kvcache_numpy_reference.py keeps the earlier all-numpy driver as the regression oracle.

The causal family's presets (runtime/causal_rollout.py) run on the same driver and core with other
`RolloutSampling`: the core's "fewstep" sampler (x0 prediction re-noised from fresh noise), one block
in flight (the DF schedule with ar_step = steps), the commit pass at their context_noise and LongLive's
recache on a prompt switch; tests/causal_rollout_reference.py keeps their host loop as the oracle.
Rolling-Forcing runs the DF async schedule with ar_step 1 (a window of `steps` blocks at staggered
steps) and asks skyrt._core.RollingCache, per step, which ring slots the step sees and with what
attention among its frames (`_view`: the sink re-rotated in front of the working blocks, full attention
over the window; the commit as their clean pass); tests/rolling_forcing_reference.py states their loop.

Noise (`NoiseSource`, one order for every stream): the prefix's addnoise_condition draw (once, first),
then per schedule row the initial noise [16, b, h, w] of each block that starts (block order) and,
after the DiT step, one draw [16, b, h, w] for each block whose sampler step re-noises (block order).
For the causal presets (one block in flight) that is their order: a block's initial noise, then one
re-noise draw after every step but the last. `Pipeline.generate` hands over the initial noise of the
whole clip first (one draw, as window mode draws it); a stream draws each block's when it starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from skyrt import _core

from . import latents as lat
from .backends.base import Backend, KVStepCall, KVStreamSpec, TextContext
from .scheduler import flow_sigmas, flow_timesteps

ROPE_TABLE = 1024  # positions in the model's RoPE table


@dataclass(frozen=True)
class KVSettings:
    """Cache policy: blocks kept forever (sink) and the rolling window of recent blocks."""

    sink_blocks: int = 1
    window_blocks: int = 8

    def validate(self, block_frames: int) -> None:
        if self.sink_blocks < 0 or self.window_blocks < 1:
            raise ValueError(
                f"sink_blocks={self.sink_blocks}, window_blocks={self.window_blocks}: need sink_blocks >= 0 and "
                "window_blocks >= 1 (e.g. sink_blocks=1, window_blocks=8)"
            )
        span = (self.sink_blocks + self.window_blocks + 1) * block_frames
        if span >= ROPE_TABLE:
            raise ValueError(
                f"sink_blocks + window_blocks = {self.sink_blocks + self.window_blocks} blocks of {block_frames} frames "
                f"do not fit the {ROPE_TABLE}-position RoPE table; use fewer blocks"
            )


def rebase_shift(position: int, frames: int, cached_frames: int) -> int:
    """How far to slide a ring's RoPE origin before `frames` frames at `position` are run: 0 while they
    fit the table, else far enough that the cached frames sit just below `position` (relative distances,
    all RoPE sees, stay the same; sink keys may go to negative positions, which is fine)."""
    return position - cached_frames if position + frames > ROPE_TABLE else 0


def switched_contexts(current: list, cond: TextContext, uncond: TextContext | None) -> list[TextContext]:
    """The prompt contexts after a prompt switch (cond, and uncond with guidance): guidance stays as the
    stream started it, on or off."""
    contexts = [c for c in (cond, uncond) if c is not None]
    if len(contexts) != len(current):
        raise ValueError("a prompt switch keeps classifier-free guidance on or off: pass uncond exactly when "
                         "the stream was started with guidance_scale > 1")
    return contexts


@dataclass(frozen=True)
class RolloutSampling:
    """The rollout core's schedule and sampler: what a mode or preset chooses, in the core's terms.

    step_template [S] (ints) drives the DF schedule; step_timesteps [S] are the (float) timesteps the DiT
    sees when they differ from it (a warped few-step list). sigmas [S + 1] are the sampler's (last 0);
    renoise_sigmas [S] the fewstep sampler's re-noise targets. ar_step None: the request's.
    recache: what set_prompt(recache=True) does, "recommit" (every cached block again, in order) or
    "longlive" (LongLive's chunk recache, see skyrt._core.RolloutCore.pack_recache).
    rolling_cache: (attention_frames, cache_frames) for Rolling-Forcing's cache policy
    (skyrt._core.RollingCache: the sink re-rotated in front of the working blocks, full attention over
    the blocks in flight, their clean pass's view); None: every cached block, block-causal attention."""

    sampler: str
    step_template: tuple[int, ...]
    sigmas: tuple[float, ...]
    step_timesteps: tuple[float, ...] = ()
    renoise_sigmas: tuple[float, ...] = ()
    commit_timestep: float = 0.0
    ar_step: int | None = None
    recache: str = "recommit"
    rolling_cache: tuple[int, int] | None = None

    @classmethod
    def diffusion_forcing(cls, req) -> "RolloutSampling":
        """The DF mode's: the official UniPC (or Euler) over the request's steps and shift, commit at t = 0."""
        return cls(req.sampler, tuple(int(t) for t in flow_timesteps(req.num_inference_steps, req.shift)),
                   tuple(float(s) for s in flow_sigmas(req.num_inference_steps, req.shift)))

    @property
    def num_steps(self) -> int:
        return len(self.step_template)


class NoiseSource:
    """The rollout's Gaussian draws in the documented order (module docstring). `initial_noise`
    [16, F, h, w] supplies the first F frames' initial noise; everything else comes from `rng`."""

    def __init__(self, rng: np.random.Generator, initial_noise: np.ndarray | None = None):
        self.rng = rng
        self.initial_noise = initial_noise

    def condition(self, shape: tuple[int, ...]) -> np.ndarray:
        """The prefix's addnoise_condition noise, drawn once for the whole prefix."""
        return self.rng.standard_normal(shape, dtype=np.float32)

    def initial(self, block: int, shape: tuple[int, ...]) -> np.ndarray:
        """Block `block`'s initial noise: the caller's, while it lasts, else a fresh draw."""
        frames, given = shape[1], self.initial_noise
        if given is not None and (block + 1) * frames <= given.shape[1]:
            return np.ascontiguousarray(given[:, block * frames : (block + 1) * frames], np.float32)
        return self.rng.standard_normal(shape, dtype=np.float32)

    def renoise(self, block: int, step: int, shape: tuple[int, ...]) -> np.ndarray:
        """The fresh noise block `block` is re-noised with after its step `step` (0-based)."""
        return self.rng.standard_normal(shape, dtype=np.float32)


def _host_array(value) -> np.ndarray:
    """A backend-native context value (numpy, or a torch tensor through .numpy()) as a host array."""
    if isinstance(value, np.ndarray):
        return value
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _json_rng_state(state: dict) -> dict:
    """numpy's bit-generator state as plain JSON values (PCG64: integers; others may hold arrays)."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, np.ndarray):
            return v.tolist()
        return int(v) if isinstance(v, np.integer) else v
    return plain(state)


class KVCache:
    """The stream's ring K/V (every prompt context) inside the rollout core: the rebase goes through
    here, so tools (benchmarks/endless.py, tests) can watch it."""

    def __init__(self, core):
        self.core = core

    def rebase(self, shift: int) -> None:
        """Ring origin += shift; every cached key rotated by -shift positions (temporal RoPE part)."""
        self.core.rebase(shift)


class KVRollout:
    """Streams clean latent blocks [16, b, h, w] of one prompt (cond, and uncond with CFG).

    A context manager: close() (or the end of `with`) releases the core's buffers and the backend's
    stream session at once; a stream that is dropped releases them when collected."""

    def __init__(self, backend: Backend, req, cond: TextContext, uncond: TextContext | None, rng, settings: KVSettings,
                 horizon_blocks: int | None = None, prefix: np.ndarray | None = None, noise: np.ndarray | None = None,
                 sampling: RolloutSampling | None = None):
        self.backend, self.req = backend, req
        self.sampling = RolloutSampling.diffusion_forcing(req) if sampling is None else sampling
        self.block = req.causal_block_size
        settings.validate(self.block)
        self.h, self.w = req.latent_size
        self.num_steps = self.sampling.num_steps
        self.ar_step = req.ar_step if self.sampling.ar_step is None else self.sampling.ar_step
        self.prefix_blocks = 0 if prefix is None else prefix.shape[1] // self.block
        in_flight = self._in_flight(horizon_blocks)
        if (settings.sink_blocks + settings.window_blocks + in_flight) * self.block > ROPE_TABLE:
            raise ValueError(f"cache plus {in_flight} blocks in flight exceed the {ROPE_TABLE}-position RoPE table")
        longlive = self.sampling.recache == "longlive"
        step_blocks = max(in_flight, settings.sink_blocks + settings.window_blocks + 1 if longlive else 0)
        layers, heads, head_dim = backend.kv_layout()
        self.contexts = [c for c in (cond, uncond) if c is not None]
        fps_class = (0 if req.fps == 16 else 1) if backend.model.inject_sample_info else None
        self.spec = KVStreamSpec(contexts=len(self.contexts), causal_block_size=self.block,
                                 max_frames=step_blocks * self.block, slots=settings.sink_blocks + settings.window_blocks,
                                 latent_size=(self.h, self.w), layers=layers, heads=heads, head_dim=head_dim,
                                 fps_class=fps_class)
        self.session = backend.open_kv_stream(self.spec)
        s = self.sampling
        try:
            self.core = _core.RolloutCore(
                list(s.step_template), list(s.sigmas), sampler=s.sampler, step_timesteps=list(s.step_timesteps),
                renoise_sigmas=list(s.renoise_sigmas), commit_timestep=s.commit_timestep, longlive_recache=longlive,
                official_df_aliasing=True, ar_step=self.ar_step, causal_block_size=self.block,
                prefix_blocks=self.prefix_blocks, max_blocks_in_flight=in_flight,
                horizon_blocks=-1 if horizon_blocks is None else horizon_blocks, sink_blocks=settings.sink_blocks,
                window_blocks=settings.window_blocks, channels=lat.LATENT_CHANNELS, height=self.h, width=self.w,
                tokens_per_frame=(self.h // lat.PATCH_SPATIAL) * (self.w // lat.PATCH_SPATIAL), layers=layers,
                heads=heads, head_dim=head_dim, contexts=len(self.contexts), kv_dtype=self.session.kv_dtype,
                guidance_scale=float(req.guidance_scale), device=self.session.device, stream=self.session.stream)
            self.session.bind(self.core)
            self.session.set_prompts(self.contexts)
            self.rolling = None if s.rolling_cache is None else _core.RollingCache(self.core, *s.rolling_cache)
        except BaseException:
            self.close()
            raise
        self.cache = KVCache(self.core)
        self.noise = NoiseSource(rng, noise)  # looked up here, so a test can replay recorded draws
        self._prefix = prefix
        self._prefix_done = 0  # prefix blocks committed so far
        self._unfinished: list[int] = []  # blocks of the current row whose commit has not been yielded yet

    def _in_flight(self, horizon_blocks: int | None) -> int:
        """Blocks denoised together: a sampling that fixes ar_step (one block at a time for the causal
        family) allows the fewest its schedule needs; else all of a finite horizon (like one official
        window), or the fewest that an endless schedule with this ar_step allows."""
        fewest = max(1, math.ceil(self.num_steps / self.ar_step)) if self.ar_step >= 1 else None
        if self.ar_step >= self.num_steps and fewest is not None:
            # Blocks run one after another, so the bound only sizes buffers; the core's schedule wants
            # the committed prefix inside it (a preset's video start may be several blocks).
            fewest = max(fewest, self.prefix_blocks)
        if horizon_blocks is not None:
            return min(horizon_blocks, fewest) if self.sampling.ar_step is not None and fewest else horizon_blocks
        if fewest is None:
            raise ValueError(
                "an endless kvcache stream needs ar_step >= 1 (blocks start one after another); "
                f"ar_step={self.num_steps} denoises one block at a time, ar_step=5 is the official async setting"
            )
        return fewest

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the core's buffers and the backend's stream session now (idempotent)."""
        session, core = getattr(self, "session", None), getattr(self, "core", None)
        self.session = self.core = None
        if session is not None:
            session.close()
        if core is not None:
            core.close()

    def __enter__(self) -> "KVRollout":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------ the loop
    def blocks(self) -> Iterator[np.ndarray]:
        """Clean latent blocks in order; prefix blocks first (already clean), then generated ones. After
        import_state, the blocks from where the exported stream stood."""
        if self._prefix_done < self.prefix_blocks:
            noise, factor, t_commit = self._prefix_noise()
            for blk in range(self._prefix_done, self.prefix_blocks):
                frames = slice(blk * self.block, (blk + 1) * self.block)
                x = np.ascontiguousarray(self._prefix[:, frames], np.float32)
                self.core.load_commit_input(x, None if noise is None else np.ascontiguousarray(noise[:, frames]),
                                            factor)
                self._commit(blk, t_commit)
                self._prefix_done = blk + 1
                yield self._prefix[:, frames]
        yield from self._finish_row()
        while True:
            plan = self.core.next_row()
            if plan is None:
                return
            yield from self._run_row(plan)

    def _run_row(self, plan) -> Iterator[np.ndarray]:
        shape = (lat.LATENT_CHANNELS, self.block, self.h, self.w)
        for blk in plan.started:
            self.core.start_block(blk, self.noise.initial(blk, shape))
        if plan.active:
            frames = self.core.pack_active()
            t = np.repeat(np.asarray(plan.timesteps, np.float32), self.block)
            position = self._position(plan.active[0], frames)
            valid, attention = self._view(plan.active[0], len(plan.active))
            self._step(frames, t, position, want_velocity=True, valid=valid, causal_block_size=attention)
            for blk in plan.step_noise:  # after the step, before the sampler: the documented draw order
                self.core.set_step_noise(blk, self.noise.renoise(blk, self.core.steps_taken(blk), shape))
            self.core.apply_velocity()
        self._unfinished = list(plan.finished)
        yield from self._finish_row()

    def _finish_row(self) -> Iterator[np.ndarray]:
        """Commit and yield the row's finished blocks; a state exported between two of them keeps the rest."""
        while self._unfinished:
            blk = self._unfinished[0]
            self.core.finish_block(blk)
            clean = self._commit(blk, self.core.commit_timestep)
            self._unfinished.pop(0)
            yield clean

    # ------------------------------------------------------------------ snapshot and resume
    def export_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(header, arrays): the stream's whole state between blocks, so that a new KVRollout of the same
        request and model continues it exactly (import_state). Arrays: the core's (skyrt._core
        RolloutCore.export_state: schedule, ring, in-flight latents and sampler history, ring K/V,
        committed inputs) under "core/", the prompt contexts under "context/<i>"; header: the noise
        generator's state, the rolling cache's sink frame, the loop's position, the prompts."""
        if self.noise.initial_noise is not None:
            raise ValueError("a rollout given its initial noise (Pipeline.generate) has no resumable state; "
                             "only streams (Pipeline.stream) snapshot")
        arrays = {f"core/{k}": v for k, v in self.core.export_state().items()}
        for i, context in enumerate(self.contexts):
            arrays[f"context/{i}"] = np.ascontiguousarray(_host_array(context.value))
        header = {"rng": _json_rng_state(self.noise.rng.bit_generator.state),
                  "sink_frame": None if self.rolling is None else int(self.rolling.sink_frame),
                  "prefix_done": self._prefix_done, "unfinished": [int(b) for b in self._unfinished],
                  "prompts": [c.prompt for c in self.contexts]}
        return header, arrays

    def import_state(self, header: dict, arrays: dict[str, np.ndarray], contexts: list[TextContext]) -> None:
        """Continue the stream `export_state` saved (call before blocks()). `contexts`: the saved prompt
        contexts as this backend's TextContexts (cond, and uncond with guidance). A state of another
        configuration is a ValueError naming the setting, and leaves this rollout as it was."""
        if len(contexts) != len(self.contexts):
            raise ValueError(f"the state has {len(contexts)} prompt context(s), this stream {len(self.contexts)} "
                             "(guidance on in one, off in the other)")
        if (header["sink_frame"] is None) != (self.rolling is None):
            raise ValueError("the state was taken with another cache policy (rolling cache on in one, off in the other)")
        rng = np.random.Generator(getattr(np.random, header["rng"]["bit_generator"])())
        rng.bit_generator.state = header["rng"]
        self.core.import_state({k[len("core/"):]: v for k, v in arrays.items() if k.startswith("core/")})
        if self.rolling is not None:
            self.rolling.restore_sink_frame(int(header["sink_frame"]))
        self.contexts = list(contexts)
        self.session.set_prompts(self.contexts)
        self.noise.rng = rng
        self._prefix_done = int(header["prefix_done"])
        self._unfinished = [int(b) for b in header["unfinished"]]

    # ------------------------------------------------------------------ networks and cache
    def _view(self, first: int, count: int, commit: bool = False) -> tuple[np.ndarray | None, int | None]:
        """(slot_valid, attention block) of a step over `count` blocks from `first` (a commit: block
        `first`): the rolling cache's view (it places the sink's keys), else (None, None): every cached
        block, the stream's block-causal attention."""
        if self.rolling is None:
            return None, None
        view = self.rolling.commit(self.core, first) if commit else self.rolling.window(self.core, first, count)
        return view.slot_valid, view.attention_frames

    def _position(self, blk: int, frames: int) -> int:
        """RoPE position of the block's first frame, rebasing the core's ring when the table would run out."""
        shift = rebase_shift(self.core.position_of(blk), frames, self.core.capacity * self.block)
        if shift:
            self.cache.rebase(shift)
        return self.core.position_of(blk)

    def _step(self, frames: int, t: np.ndarray, position: int, want_velocity: bool = False, want_kv: bool = False,
              valid: np.ndarray | None = None, causal_block_size: int | None = None) -> None:
        valid = self.core.valid if valid is None else valid
        self.session.step(KVStepCall(frames=frames, timesteps=t, position=position, slot_valid=valid,
                                     want_velocity=want_velocity, want_kv=want_kv,
                                     causal_block_size=causal_block_size))

    def _prefix_noise(self) -> tuple[np.ndarray | None, float, float]:
        """(noise, factor, timestep) the prefix blocks are committed with: none at the commit timestep, or with
        addnoise_condition a, 0.1%·a of noise at t = a. The official loop redraws that noise at every
        step, which no cache can do: it is drawn once, for the whole prefix, here (the window mode's
        condition_noise="once" does the same and is the reference for this mode)."""
        a = self.req.addnoise_condition
        if a <= 0:  # the clean pass of every finished block (a causal family's context_noise; DF: 0)
            return None, 0.0, float(self.core.commit_timestep)
        return self.noise.condition(self._prefix.shape), 0.001 * a, float(a)

    def _commit(self, blk: int, t_commit: float) -> np.ndarray:
        """Clean pass of block `blk` (its input already in the core's store at next_slot) at timestep
        t_commit: its K/V enter the ring. Returns the block's clean latents [16, b, h, w] (host)."""
        slot = self.core.next_slot()
        self.core.pack_store(slot)
        position = self._position(blk, self.block)
        valid, _ = self._view(blk, 1, commit=True)
        self._step(self.block, np.full(self.block, t_commit, np.float32), position, want_kv=True, valid=valid)
        self.core.commit(blk, t_commit)
        return self.core.read_store(slot)

    # ------------------------------------------------------------------ prompt switch
    def set_prompt(self, cond: TextContext, uncond: TextContext | None, recache: bool = False) -> None:
        """Denoise with a new prompt from the next schedule row on (call between blocks).

        Blocks in flight keep their partly denoised latents. Without `recache` the cached blocks keep
        the K/V they were committed with under the old prompt (a soft transition). With it, the sampling's
        recache policy: "recommit", every cached block committed again under the new prompt, in block
        order, each against the blocks re-committed before it, at its current position (one clean pass
        per cached block; with the rolling cache each sees what its clean pass saw, as far as the ring
        still holds it); "longlive", LongLive's recache (one full-attention clean pass over the last
        sink + window + 1 blocks, skyrt._core.RolloutCore.pack_recache).
        """
        self.contexts = switched_contexts(self.contexts, cond, uncond)
        self.session.set_prompts(self.contexts)
        if recache:
            self.recache()

    def recache(self) -> None:
        """Re-anchor the cache under the current prompt (call between blocks): the cached window and the
        sink committed again with the sampling's recache policy, the one a prompt switch with recache
        uses ("recommit": every cached block, sink first, in block order; "longlive": LongLive's chunk
        recache). What the drift monitor's reanchor="recache" runs (runtime/drift.py). Under an unchanged
        prompt, before any block left the ring, it rewrites the K/V they already hold (block-causal);
        after evictions the oldest window blocks are recomputed without the history they were committed
        against, so the prompt weighs more in what the stream continues from."""
        self._recache_longlive() if self.sampling.recache == "longlive" else self._recommit()

    def _recache_longlive(self) -> None:
        plan = self.core.pack_recache()
        if not plan.frames:
            return
        if plan.position < 0:
            # Cannot happen: a rebase leaves the next block at >= (sink + window + 1) * b, the chunk >= sink * b.
            raise RuntimeError(f"recache chunk starts at RoPE position {plan.position}")
        t = np.full(plan.frames, self.core.commit_timestep, np.float32)
        self._step(plan.frames, t, plan.position, want_kv=True, valid=plan.slot_valid, causal_block_size=plan.frames)
        self.core.write_recache()

    def _recommit(self) -> None:
        valid = np.zeros(self.core.capacity, dtype=bool)
        live = self.core.valid
        for blk, slot in sorted((int(b), s) for s, b in enumerate(self.core.slot_block) if live[s]):
            self.core.pack_store(slot)
            t = np.full(self.block, self.core.committed_timestep(slot), np.float32)
            shown = valid.copy()
            if self.rolling is not None:  # its clean pass's view (the sink back at its own frames)
                shown &= self._view(blk, 1, commit=True)[0]
            self._step(self.block, t, self.core.position_of(blk), want_kv=True, valid=shown)
            self.core.write_kv(slot)
            valid[slot] = True
