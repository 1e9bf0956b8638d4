"""The causal family's host loop (the runtime's CausalRollout until the rollout core took the causal
presets over, runtime/kvcache.py + runtime/causal_rollout.py). Kept unchanged as a frozen test oracle
(imports made absolute, the block size read as causal_block_size, the schedule tables and the ring
helper it used copied in): tests/test_causal_family.py checks the core against it on runs longer than
the fixtures. Not used by the runtime.

Their loop, per block: x = initial noise; per step x0 = x - sigma * v (float64, then float32), then,
but after the last step, x = (1 - sigma') * x0 + sigma' * fresh noise (float32); commit x0 with a
clean pass at t = context_noise. LongLive's recache on a prompt switch (`_recache`).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from skyrt import _core
from skyrt.runtime import latents as lat
from skyrt.runtime.backends.base import Backend, TextContext
from skyrt.runtime.causal_rollout import CausalSampling
from skyrt.runtime.kvcache import KVSettings, rebase_shift, switched_contexts

import step_reference


def ring_position(ring, caches: list, blk: int, frames: int) -> int:
    """RoPE position of block `blk`'s first frame (`frames` frames from there), rebasing a host ring
    (skyrt._core.KVRing) and its host caches when the table would run out."""
    shift = rebase_shift(ring.position_of(blk), frames, ring.capacity * ring.frames_per_block)
    if shift:
        ring.rebase(shift)
        for cache in caches:
            cache.rebase(shift)
    return ring.position_of(blk)


TRAIN_TIMESTEPS = 1000  # their scheduler grid: 1000 training timesteps


# ------------------------------------------------------------------------------------------ schedule
def flow_match_grid(shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps), float32 [1000] each, bit-identical to their FlowMatchScheduler(shift,
    sigma_min=0, extra_one_step=True).set_timesteps(1000, training=True) on an x86-64 CPU.

    torch's float32 linspace fills the first half as start + step * i and the second as end - step *
    (n - 1 - i), each a fused multiply-add (one rounding): emulated in float64, then rounded once. Then
    sigma <- shift * s / (1 + (shift - 1) * s) and timestep = 1000 * sigma, all in float32.
    """
    n = TRAIN_TIMESTEPS + 1  # extra_one_step: 1001 points, the last (sigma 0) dropped
    i = np.arange(n, dtype=np.float64)
    step = np.float64((np.float32(0.0) - np.float32(1.0)) / np.float32(n - 1))
    linear = np.where(i < n // 2, 1.0 + step * i, 0.0 - step * (n - 1 - i)).astype(np.float32)[:-1]
    s = np.float32(shift)
    sigmas = (s * linear / (np.float32(1.0) + (s - np.float32(1.0)) * linear)).astype(np.float32)
    return sigmas, (sigmas * np.float32(TRAIN_TIMESTEPS)).astype(np.float32)


def _nearest(grid: np.ndarray, t: float, dtype) -> int:
    """Index of the grid timestep nearest to t, compared in `dtype` (their argmin |timesteps - t|)."""
    return int(np.argmin(np.abs(grid.astype(dtype) - dtype(t))))


@dataclass(frozen=True)
class FewStepSchedule:
    """The timesteps the DiT sees and the sigmas of their x0 conversion and re-noising, per step."""

    timesteps: np.ndarray  # float32 [n]
    sigma_x0: np.ndarray  # float32 [n]: looked up in float64 (their _convert_flow_pred_to_x0)
    sigma_noise: np.ndarray  # float32 [n]: looked up in float32 (their add_noise)

    @classmethod
    def from_sampling(cls, sampling: CausalSampling, shift: float | None = None) -> "FewStepSchedule":
        sigmas, grid = flow_match_grid(sampling.timestep_shift if shift is None else shift)
        steps = np.array(sampling.denoising_step_list, dtype=np.float64)
        if sampling.warp_denoising_step:
            # timesteps + [0], indexed at 1000 - s (their `timesteps[1000 - denoising_step_list]`)
            extended = np.concatenate([grid, np.zeros(1, np.float32)])
            timesteps = extended[TRAIN_TIMESTEPS - steps.astype(np.int64)]
        else:
            timesteps = steps.astype(np.float32)  # integer steps (int64 in their code: exact in float32)
        sigma_x0 = np.array([sigmas[_nearest(grid, t, np.float64)] for t in timesteps], np.float32)
        sigma_noise = np.array([sigmas[_nearest(grid, t, np.float32)] for t in timesteps], np.float32)
        return cls(timesteps.astype(np.float32), sigma_x0, sigma_noise)

    def __len__(self) -> int:
        return len(self.timesteps)

    def x0(self, x: np.ndarray, velocity: np.ndarray, step: int) -> np.ndarray:
        """Flow output -> clean prediction, x0 = x - sigma * v in float64 (as theirs), float32 out."""
        sigma = np.float64(self.sigma_x0[step])
        return (x.astype(np.float64) - sigma * velocity.astype(np.float64)).astype(np.float32)

    def renoise(self, x0: np.ndarray, noise: np.ndarray, step: int) -> np.ndarray:
        """x0 noised to step `step`'s timestep: (1 - sigma) * x0 + sigma * noise, float32."""
        sigma = self.sigma_noise[step]
        return ((np.float32(1.0) - sigma) * x0 + sigma * noise).astype(np.float32)


# ------------------------------------------------------------------------------------------ noise
class NoiseSource:
    """The rollout's Gaussian draws in the documented order (module docstring). `initial_noise`
    [16, F, h, w] supplies the first F frames' initial noise; everything else comes from `rng`."""

    def __init__(self, rng: np.random.Generator, initial_noise: np.ndarray | None = None):
        self.rng = rng
        self.initial_noise = initial_noise

    def initial(self, block: int, shape: tuple[int, ...]) -> np.ndarray:
        frames = shape[1]
        given = self.initial_noise
        if given is not None and (block + 1) * frames <= given.shape[1]:
            return np.array(given[:, block * frames : (block + 1) * frames], np.float32)
        return self.rng.standard_normal(shape, dtype=np.float32)

    def renoise(self, block: int, step: int, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32)


# ------------------------------------------------------------------------------------------ rollout
class CausalRollout:
    """Streams the clean latent blocks [16, b, h, w] of a causal-family checkpoint (see module docstring).

    The same interface as kvcache.KVRollout (`blocks()`, `set_prompt`); this one runs on the Backend's
    per-call KV-cached step (tests/step_reference.py: kv_prompt, kv_step_many, new_kv_cache) and
    skyrt._core.KVRing.
    """

    def __init__(self, backend: Backend, sampling: CausalSampling, cond: TextContext, uncond: TextContext | None,
                 guidance_scale: float, latent_size: tuple[int, int], settings: KVSettings, noise: NoiseSource,
                 horizon_blocks: int | None = None, shift: float | None = None, fps_class: int | None = None):
        self.backend, self.sampling, self.noise = backend, sampling, noise
        self.block = sampling.causal_block_size
        settings.validate(self.block)
        self.schedule = FewStepSchedule.from_sampling(sampling, shift)
        self.guidance_scale = guidance_scale
        self.h, self.w = latent_size
        self.horizon = horizon_blocks
        self.ring = _core.KVRing(settings.sink_blocks, settings.window_blocks, self.block)
        layers, heads, head_dim = backend.kv_layout()
        self.tokens_per_block = self.block * (self.h // lat.PATCH_SPATIAL) * (self.w // lat.PATCH_SPATIAL)
        self.contexts = [c for c in (cond, uncond) if c is not None]
        self.prompts = [step_reference.kv_prompt(backend, c) for c in self.contexts]
        self.caches = [step_reference.new_kv_cache(backend, layers, self.ring.capacity, self.tokens_per_block, heads,
                                                   head_dim)
                       for _ in self.contexts]
        self.fps_class = fps_class  # only for a DiT with the fps embedding (none of the released family has one)
        # Clean latents a LongLive recache recomputes: the sink blocks and the last window + 1 blocks.
        self._sink_latents: dict[int, np.ndarray] = {}
        self._recent: deque[tuple[int, np.ndarray]] = deque(maxlen=settings.window_blocks + 1)
        self.next_block = 0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (lat.LATENT_CHANNELS, self.block, self.h, self.w)

    def close(self) -> None:
        """Drop the stream's host caches and prompt K/V now (idempotent; the Pipeline closes every
        rollout it opens, as it does kvcache.KVRollout's core buffers)."""
        self.caches, self.prompts = [], []
        self._sink_latents.clear()
        self._recent.clear()

    def __enter__(self) -> "CausalRollout":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop
    def blocks(self) -> Iterator[np.ndarray]:
        """Clean latent blocks in order, forever or up to `horizon_blocks`."""
        while self.horizon is None or self.next_block < self.horizon:
            yield self.next()

    def next(self) -> np.ndarray:
        """Denoise the next block, commit it to the cache, return its clean latents [16, b, h, w]."""
        blk = self.next_block
        position = ring_position(self.ring, self.caches, blk, self.block)
        valid = np.asarray(self.ring.valid, dtype=bool)
        x = self.noise.initial(blk, self.shape)
        for step in range(len(self.schedule)):
            t = np.full(self.block, self.schedule.timesteps[step], np.float32)
            x0 = self.schedule.x0(x, self._velocity(x, t, position, valid), step)
            if step + 1 < len(self.schedule):
                x = self.schedule.renoise(x0, self.noise.renoise(blk, step, self.shape), step + 1)
        self._commit(blk, x0, position, valid)
        self.next_block += 1
        return x0

    def _velocity(self, x: np.ndarray, t: np.ndarray, position: int, valid: np.ndarray) -> np.ndarray:
        outs = self._step(x, t, position, valid, self.block)
        if len(outs) == 1:
            return outs[0][0]
        (v_cond, _, _), (v_uncond, _, _) = outs
        guided = np.empty(v_cond.shape, np.float32)  # uncond + scale (cond - uncond): the core's, as every mode's guidance
        _core.cfg_combine(np.ascontiguousarray(v_cond), np.ascontiguousarray(v_uncond), guided, self.guidance_scale)
        return guided

    def _step(self, x, t, position, valid, block_size):
        return step_reference.kv_step_many(self.backend, x, t, self.prompts, self.caches, valid, position,
                                           self.fps_class, block_size)

    def _commit(self, blk: int, x0: np.ndarray, position: int, valid: np.ndarray) -> None:
        """Their clean-context pass: x0 at t = context_noise, against the same cache; its K/V enter the ring."""
        t = np.full(self.block, self.sampling.context_noise, np.float32)
        outs = self._step(x0, t, position, valid, self.block)
        slot = self.ring.append(blk).slot
        for cache, (_, k, v) in zip(self.caches, outs):
            cache.write(slot, k, v)
        if blk < self.ring.sink_blocks:
            self._sink_latents[blk] = x0
        self._recent.append((blk, x0))

    # ------------------------------------------------------------------ prompt switch
    def set_prompt(self, cond: TextContext, uncond: TextContext | None, recache: bool = False) -> None:
        """Denoise with a new prompt from the next block on (call between blocks).

        Without `recache` the cache keeps the K/V its blocks were committed with. With it, the cache is
        recomputed under the new prompt by LongLive's method (see `_recache`).
        """
        self.contexts = switched_contexts(self.contexts, cond, uncond)
        self.prompts = [step_reference.kv_prompt(self.backend, c) for c in self.contexts]
        if recache:
            self._recache()

    def _recache(self) -> None:
        """LongLive's `_recache_after_switch` (global_sink true), before block j: one clean pass at
        t = context_noise under the new prompt over the last L = (sink + window + 1) blocks, with full
        (not causal) attention among them, at their own positions.
        - j <= L (their chunk starts at frame 0): every finished block is recomputed, attending only to
          each other; the sink is rewritten too.
        - j > L: the sink keeps its K/V; the chunk's first `sink` blocks are left out (their code neither
          attends to nor writes them); the rest attend to each other and to the sink's old K/V.
        The new K/V of blocks still in the ring replace theirs (the oldest chunk block, already evicted
        from skyrt's ring, only serves as keys: their next block evicts it)."""
        j, sink, window = self.next_block, self.ring.sink_blocks, self.ring.window_blocks
        if j == 0:
            return
        latents = {**self._sink_latents, **dict(self._recent)}
        valid = np.zeros(self.ring.capacity, dtype=bool)
        if j <= sink + window + 1:
            chunk = list(range(j))
        else:
            chunk = list(range(j - window - 1, j))
            valid[:sink] = np.asarray(self.ring.valid, dtype=bool)[:sink]
        x = np.concatenate([latents[b] for b in chunk], axis=1)  # [16, len(chunk) * b, h, w]
        t = np.full(x.shape[1], self.sampling.context_noise, np.float32)
        position = self.ring.position_of(chunk[0])
        if position < 0:
            # Cannot happen: a rebase leaves block j at >= (sink + window + 1) * b, the chunk >= sink * b.
            raise RuntimeError(f"recache chunk starts at RoPE position {position}")
        outs = self._step(x, t, position, valid, block_size=x.shape[1])  # one block: full attention
        slot_of = {int(b): s for s, b in enumerate(np.asarray(self.ring.slot_block)) if b >= 0}
        n = self.tokens_per_block
        for i, blk in enumerate(chunk):
            if blk in slot_of:
                for cache, (_, k, v) in zip(self.caches, outs):
                    cache.write(slot_of[blk], k[:, i * n : (i + 1) * n], v[:, i * n : (i + 1) * n])
