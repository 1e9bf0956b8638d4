"""The causal Wan2.1 family's few-step rollout (Self-Forcing, CausVid, LongLive), as their own code runs it.

Their inference loop, block after block of `num_frame_per_block` latent frames (blocks never overlap
in time; one block is denoised at a time):

    x = the block's initial noise                                          [16, b, h, w]
    for each timestep t_i of the denoising step list:
        v  = DiT(x, t_i) with the block attending to itself and the KV cache of finished blocks
        x0 = x - sigma(t_i) * v                     (float64, then float32: their flow -> x0 conversion)
        if not the last step:
            x = (1 - sigma(t_i+1)) * x0 + sigma(t_i+1) * fresh noise          (float32: their add_noise)
    the block is x0; a clean-context pass DiT(x0, t = context_noise) writes its K/V into the cache.

sigma(t) is the sigma of the grid timestep nearest to t on their 1000-step shifted flow grid
(`FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(1000, training=True)`);
with `warp_denoising_step` the step list itself is read off that grid (timestep[1000 - s]). No noise is
added to x0 before the clean-context pass, whatever `context_noise` is: their code only passes it as
the timestep. RoPE: a block's frames sit at their absolute frame index; cached keys keep theirs.

Cache: skyrt._core.KVRing, `sink_blocks` kept forever plus a rolling window of `window_blocks`. Their
local attention (`local_attn_size` L frames, `sink_size` S frames, both whole blocks) is exactly
sink_blocks = S / b, window_blocks = L / b - S / b - 1: a block attends to the first S frames, the most
recent frames and itself, L frames at most. Global attention (L = -1) is exact while every finished
block is in the ring; their code stops there anyway (a 21-frame cache at 480x832).

Where skyrt departs from their code (see README, "Causal Wan family"):
- past the ring their global-attention families (Self-Forcing, CausVid) cannot go at all; skyrt rolls
  the window on (the first `sink_blocks` blocks stay as the sink);
- at the 1024-position RoPE table their absolute positions fail; skyrt rebases the cache (cached keys
  rotated by minus the shift, temporal part only): relative positions, all RoPE sees, stay exact;
- a prompt switch with `recache=True` is LongLive's KV recache (`_recache_after_switch`, global_sink
  true) for every family; a global-attention family past its ring recaches like a local one.
- noise comes from numpy (seeded), not torch's generator: same seed, same video in skyrt, not their bits.

Noise order (what `NoiseSource` hands out, so a test can replay recorded draws): for each block in
order, its initial noise [16, b, h, w] (`initial`), then one re-noise draw [16, b, h, w] after every
denoising step but the last (`renoise`). `Pipeline.generate` fills the initial noise of the whole clip
first (their order: one noise tensor, then the re-noise draws); a stream draws each block's initial
noise when the block starts.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from skyrt import _core

from . import latents as lat
from .backends.base import Backend, TextContext
from .kvcache import KVSettings, ring_position, switched_contexts

TRAIN_TIMESTEPS = 1000  # their scheduler grid: 1000 training timesteps


# ------------------------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class CausalSampling:
    """A causal family's sampler and cache settings, under their config names."""

    denoising_step_list: tuple[float, ...] = (1000, 750, 500, 250)
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    num_frame_per_block: int = 3
    context_noise: float = 0.0
    local_attn_size: int = -1  # frames a block attends to, itself included; -1 = global attention
    sink_size: int = 0  # first frames kept in the cache forever (with local attention)

    def __post_init__(self):
        steps = tuple(float(s) for s in self.denoising_step_list)
        object.__setattr__(self, "denoising_step_list", steps)
        if not steps:
            raise ValueError("denoising_step_list is empty: give the timesteps to denoise at, e.g. (1000, 750, 500, 250)")
        if self.warp_denoising_step and any(s != int(s) or not 0 < s <= TRAIN_TIMESTEPS for s in steps):
            raise ValueError(f"denoising_step_list={steps}: warping reads timestep[1000 - s] off the grid, so every "
                             "s must be an integer in 1..1000 (drop a trailing 0, as their configs say)")
        if self.num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block={self.num_frame_per_block} must be >= 1")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift={self.timestep_shift} must be positive")

    def ring(self, block_frames: int | None = None) -> KVSettings:
        """sink_blocks / window_blocks that reproduce their cache for blocks of `block_frames` frames."""
        b = block_frames or self.num_frame_per_block
        if self.local_attn_size == -1:
            raise ValueError("global attention has no ring size of its own: choose sink_blocks and window_blocks")
        if self.local_attn_size % b or self.sink_size % b:
            raise ValueError(f"local_attn_size={self.local_attn_size} and sink_size={self.sink_size} frames are not "
                             f"whole blocks of {b} frames: skyrt's cache keeps whole blocks")
        window = self.local_attn_size // b - self.sink_size // b - 1
        if window < 1:
            raise ValueError(f"local_attn_size={self.local_attn_size} leaves no room for a rolling window beside "
                             f"sink_size={self.sink_size} and a block of {b}")
        return KVSettings(sink_blocks=self.sink_size // b, window_blocks=window)


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

    The same interface as kvcache.KVRollout (`blocks()`, `set_prompt`), so Pipeline's kvcache
    generate/stream drive either; this one runs on the Backend's KV-cached step (kv_prompt,
    kv_step_many, new_kv_cache) and skyrt._core.KVRing.
    """

    def __init__(self, backend: Backend, sampling: CausalSampling, cond: TextContext, uncond: TextContext | None,
                 guidance_scale: float, latent_size: tuple[int, int], settings: KVSettings, noise: NoiseSource,
                 horizon_blocks: int | None = None, shift: float | None = None, fps_class: int | None = None):
        self.backend, self.sampling, self.noise = backend, sampling, noise
        self.block = sampling.num_frame_per_block
        settings.validate(self.block)
        self.schedule = FewStepSchedule.from_sampling(sampling, shift)
        self.guidance_scale = guidance_scale
        self.h, self.w = latent_size
        self.horizon = horizon_blocks
        self.ring = _core.KVRing(settings.sink_blocks, settings.window_blocks, self.block)
        layers, heads, head_dim = backend.kv_layout()
        self.tokens_per_block = self.block * (self.h // lat.PATCH_SPATIAL) * (self.w // lat.PATCH_SPATIAL)
        self.contexts = [c for c in (cond, uncond) if c is not None]
        self.prompts = [backend.kv_prompt(c) for c in self.contexts]
        self.caches = [backend.new_kv_cache(layers, self.ring.capacity, self.tokens_per_block, heads, head_dim)
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
        return self.backend.kv_step_many(x, t, self.prompts, self.caches, valid, position, self.fps_class, block_size)

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
        self.prompts = [self.backend.kv_prompt(c) for c in self.contexts]
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
