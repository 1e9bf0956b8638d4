"""FROZEN REFERENCE: the all-numpy KV-cached rollout as runtime/kvcache.py was before the rollout
core (skyrt._core.RolloutCore) took the stream's state over. Kept unchanged (imports made absolute)
as the regression oracle of tests/test_kvcache_core.py: per-frame numpy samplers (once
runtime/scheduler.py's, now tests/window_numpy_reference.py), one host cache per prompt context,
the backend's kv_step_many per call (now tests/step_reference.py's). Not used by the runtime.

The KV-cached diffusion-forcing rollout (mode="kvcache"): each block is denoised once, forever.

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

Shapes: latents [16, F, h, w] model space; one cache per prompt context (CFG keeps two), each
K and V [layers, slots * tokens_per_block, heads, head_dim] float32, allocated once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from skyrt import _core

from skyrt.runtime import latents as lat
from skyrt.runtime.backends.base import Backend, TextContext

import step_reference
from step_reference import HostKVCache

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


# The host cache lives with the backends (each backend may keep its cache elsewhere, e.g. on the GPU).
KVCache = HostKVCache


class KVRollout:
    """Streams clean latent blocks [16, b, h, w] of one prompt (cond, and uncond with CFG)."""

    def __init__(self, backend: Backend, req, cond: TextContext, uncond: TextContext | None, rng, settings: KVSettings,
                 horizon_blocks: int | None = None, prefix: np.ndarray | None = None, noise: np.ndarray | None = None):
        from window_numpy_reference import new_sampler, timestep_template

        self.backend, self.req, self.rng = backend, req, rng
        self.block = req.causal_block_size
        settings.validate(self.block)
        self.h, self.w = req.latent_size
        template = timestep_template(req)
        self.num_steps = len(template)
        self.prefix_blocks = 0 if prefix is None else prefix.shape[1] // self.block
        in_flight = self._in_flight(horizon_blocks)
        if (settings.sink_blocks + settings.window_blocks + in_flight) * self.block > ROPE_TABLE:
            raise ValueError(f"cache plus {in_flight} blocks in flight exceed the {ROPE_TABLE}-position RoPE table")
        self.schedule = _core.DFSchedule(
            template, ar_step=req.ar_step, causal_block_size=self.block, num_prefix_blocks=self.prefix_blocks,
            max_blocks_in_flight=in_flight, horizon_blocks=-1 if horizon_blocks is None else horizon_blocks,
        )
        self.ring = _core.KVRing(settings.sink_blocks, settings.window_blocks, self.block)
        layers, heads, head_dim = backend.kv_layout()
        tokens = self.block * (self.h // lat.PATCH_SPATIAL) * (self.w // lat.PATCH_SPATIAL)
        self.tokens_per_block = tokens
        self.contexts = [c for c in (cond, uncond) if c is not None]
        self.prompts = [step_reference.kv_prompt(backend, c) for c in self.contexts]
        self.caches = [step_reference.new_kv_cache(backend, layers, self.ring.capacity, tokens, heads, head_dim)
                       for _ in self.contexts]
        self.fps_class = (0 if req.fps == 16 else 1) if backend.model.inject_sample_info else None
        self._new_sampler = lambda: new_sampler(req)
        self.latents: dict[int, np.ndarray] = {}  # block id -> [16, b, h, w] while being denoised
        self.samplers: dict[int, list] = {}
        self._noise = noise
        self._prefix = prefix
        self.committed: dict[int, tuple[int, np.ndarray, float]] = {}  # slot -> (block, commit input, t)

    def _in_flight(self, horizon_blocks: int | None) -> int:
        """Blocks denoised together: all of a finite horizon (like one official window), else the
        fewest that an endless schedule with this ar_step allows."""
        if horizon_blocks is not None:
            return horizon_blocks
        if self.req.ar_step < 1:
            raise ValueError(
                "an endless kvcache stream needs ar_step >= 1 (blocks start one after another); "
                f"ar_step={self.num_steps} denoises one block at a time, ar_step=5 is the official async setting"
            )
        return max(1, math.ceil(self.num_steps / self.req.ar_step))

    # ------------------------------------------------------------------ the loop
    def blocks(self) -> Iterator[np.ndarray]:
        """Clean latent blocks in order; prefix blocks first (already clean), then generated ones."""
        if self.prefix_blocks:
            inputs, t_commit = self._prefix_commit_inputs()
            for blk in range(self.prefix_blocks):
                frames = slice(blk * self.block, (blk + 1) * self.block)
                self._commit(blk, inputs[:, frames], t_commit)
                yield self._prefix[:, frames]
        while True:
            step = self.schedule.next()
            if step is None:
                return
            yield from self._run_row(step)

    def _run_row(self, step) -> Iterator[np.ndarray]:
        active = [step.first + i for i, idx in enumerate(step.index) if 1 <= idx <= self.num_steps]
        timesteps = {step.first + i: int(t) for i, t in enumerate(step.timestep)}
        updates = {step.first + i for i, u in enumerate(step.update) if u}
        if active:
            for blk in active:
                self._start(blk)
            x = np.concatenate([self.latents[b] for b in active], axis=1)  # [16, f, h, w]
            t = np.repeat(np.array([timesteps[b] for b in active], np.float32), self.block)
            v = self._velocity(x, t, first_block=active[0])
            for i, blk in enumerate(active):
                if blk in updates:
                    self._step_block(blk, v[:, i * self.block : (i + 1) * self.block], timesteps[blk])
        for blk in step.finished:
            clean = self.latents.pop(blk)
            self.samplers.pop(blk)
            self._commit(blk, clean, 0.0)
            yield clean

    def _start(self, blk: int) -> None:
        if blk in self.latents:
            return
        shape = (lat.LATENT_CHANNELS, self.block, self.h, self.w)
        if self._noise is not None and (blk + 1) * self.block <= self._noise.shape[1]:
            z = self._noise[:, blk * self.block : (blk + 1) * self.block].copy()
        else:
            z = self.rng.standard_normal(shape, dtype=np.float32)
        self.latents[blk] = z
        self.samplers[blk] = [self._new_sampler() for _ in range(self.block)]

    def _step_block(self, blk: int, v: np.ndarray, timestep: int) -> None:
        z = self.latents[blk]
        for f, sampler in enumerate(self.samplers[blk]):
            z[:, f] = sampler.step(v[:, f], timestep, z[:, f])

    # ------------------------------------------------------------------ networks and cache
    def _position(self, blk: int, frames: int) -> int:
        """RoPE position of the block's first frame, rebasing the cache when the table would run out."""
        pos = self.ring.position_of(blk)
        if pos + frames > ROPE_TABLE:
            # Slide the origin so the cached blocks sit just below `pos`: relative distances, all
            # RoPE sees, stay the same; sink keys may go to negative positions, which is fine.
            shift = pos - self.ring.capacity * self.block
            self.ring.rebase(shift)
            for cache in self.caches:
                cache.rebase(shift)
            pos = self.ring.position_of(blk)
        return pos

    def _velocity(self, x: np.ndarray, t: np.ndarray, first_block: int) -> np.ndarray:
        position = self._position(first_block, x.shape[1])
        valid = np.asarray(self.ring.valid, dtype=bool)
        outs = [out[0] for out in step_reference.kv_step_many(self.backend, x, t, self.prompts, self.caches, valid,
                                                             position,
                                                             self.fps_class, self.block)]
        if len(outs) == 1:
            return outs[0]
        v_cond, v_uncond = outs
        return v_uncond + self.req.guidance_scale * (v_cond - v_uncond)

    def _prefix_commit_inputs(self) -> tuple[np.ndarray, float]:
        """What the prefix blocks are committed with: the clean prefix at t = 0, or with
        addnoise_condition a, the prefix with 0.1%·a noise at t = a. The official loop redraws that
        noise at every step, which no cache can do: it is drawn once, for the whole prefix, here (the
        window mode's condition_noise="once" does the same and is the reference for this mode)."""
        a = self.req.addnoise_condition
        if a <= 0:
            return self._prefix, 0.0
        noise = self.rng.standard_normal(self._prefix.shape, dtype=np.float32)
        return self._prefix * (1.0 - 0.001 * a) + noise * (0.001 * a), float(a)

    def _commit(self, blk: int, x: np.ndarray, t_commit: float) -> None:
        """Clean pass of block `blk` (latents x [16, b, h, w] at timestep t_commit): its K/V enter the ring."""
        position = self._position(blk, self.block)
        valid = np.asarray(self.ring.valid, dtype=bool)
        kvs = self._commit_kv(x, t_commit, position, valid)
        slot = self.ring.append(blk).slot
        self.committed[slot] = (blk, x, t_commit)  # kept for a recache under a new prompt
        for cache, (k, v) in zip(self.caches, kvs):
            cache.write(slot, k, v)

    def _commit_kv(self, x: np.ndarray, t_commit: float, position: int, valid: np.ndarray) -> list:
        t = np.full(self.block, t_commit, np.float32)
        return [out[1:] for out in step_reference.kv_step_many(self.backend, x, t, self.prompts, self.caches, valid,
                                                              position,
                                                              self.fps_class, self.block)]

    # ------------------------------------------------------------------ prompt switch
    def set_prompt(self, cond: TextContext, uncond: TextContext | None, recache: bool = False) -> None:
        """Denoise with a new prompt from the next schedule row on (call between blocks).

        Blocks in flight keep their partly denoised latents. Without `recache` the cached blocks keep
        the K/V they were committed with under the old prompt (a soft transition); with it, every
        cached block is committed again under the new prompt, in block order, each against the
        blocks re-committed before it, at its current position (one clean pass per cached block).
        """
        contexts = [c for c in (cond, uncond) if c is not None]
        if len(contexts) != len(self.contexts):
            raise ValueError("a prompt switch keeps classifier-free guidance on or off: pass uncond exactly when "
                             "the stream was started with guidance_scale > 1")
        self.contexts = contexts
        self.prompts = [step_reference.kv_prompt(self.backend, c) for c in contexts]
        if recache:
            self._recache()

    def _recache(self) -> None:
        valid = np.zeros(self.ring.capacity, dtype=bool)
        live = np.asarray(self.ring.valid, dtype=bool)
        in_ring = sorted((blk, slot) for slot, (blk, _, _) in self.committed.items() if live[slot])
        for blk, slot in in_ring:
            _, x, t_commit = self.committed[slot]
            kvs = self._commit_kv(x, t_commit, self.ring.position_of(blk), valid)
            for cache, (k, v) in zip(self.caches, kvs):
                cache.write(slot, k, v)
            valid[slot] = True
