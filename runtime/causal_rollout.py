"""The causal Wan2.1 family's few-step sampling (Self-Forcing, CausVid, LongLive, Causal-Forcing, Rolling-Forcing),
as settings of the rollout core.

Their inference loop, block after block of `causal_block_size` latent frames (their
`num_frame_per_block`; blocks never overlap in time; one block is denoised at a time):

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

skyrt runs that loop on the one rollout engine (runtime/kvcache.py KVRollout driving
skyrt._core.RolloutCore), with `rollout_sampling`: the core's "fewstep" sampler (the x0 and re-noise
above, float64 / float32 as theirs), the DF schedule with ar_step = steps (one block in flight), the
commit pass at t = context_noise, and LongLive's recache as the prompt-switch policy. Noise, CFG, the
fps class and the ring are the kvcache mode's (kvcache.NoiseSource's order is theirs with one block in
flight). tests/causal_rollout_reference.py keeps the host loop this replaced, as a frozen oracle.

Cache: the core's ring, `sink_blocks` kept forever plus a rolling window of `window_blocks`. Their
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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kvcache import KVSettings, RolloutSampling

TRAIN_TIMESTEPS = 1000  # their scheduler grid: 1000 training timesteps


# ------------------------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class CausalSampling:
    """A causal family's sampler and cache settings, under their config names (but the block size's:
    `causal_block_size` is their num_frame_per_block; `from_config` takes their names)."""

    denoising_step_list: tuple[float, ...] = (1000, 750, 500, 250)
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    causal_block_size: int = 3
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
        if self.causal_block_size < 1:
            raise ValueError(f"causal_block_size={self.causal_block_size} must be >= 1")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift={self.timestep_shift} must be positive")

    @classmethod
    def from_config(cls, **config) -> "CausalSampling":
        """Settings under their config files' names (num_frame_per_block for the block size)."""
        if "num_frame_per_block" in config:
            config["causal_block_size"] = config.pop("num_frame_per_block")
        return cls(**config)

    def ring(self, causal_block_size: int | None = None) -> KVSettings:
        """sink_blocks / window_blocks that reproduce their cache for blocks of `causal_block_size` frames."""
        b = causal_block_size or self.causal_block_size
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


def rollout_sampling(sampling: CausalSampling, shift: float | None = None,
                     rolling_cache: tuple[int, int] | None = None) -> RolloutSampling:
    """Their loop in the rollout core's terms: the fewstep sampler over their step list (the DiT sees the
    float32 timesteps; x0 takes sigma_x0, a re-noise to step k sigma_noise[k]), one block in flight
    (ar_step = steps), the commit pass at t = context_noise, LongLive's recache on a prompt switch.

    rolling_cache (attention_frames, cache_frames): Rolling-Forcing's loop instead, a rolling window of
    `steps` blocks at staggered timesteps in one DiT call (the DF async schedule with ar_step = 1: block j
    at step w - j of row w, re-noise draws oldest block first), full attention over the window, the sink
    re-rotated in front of the working blocks and the clean pass of the window's oldest block as the
    commit (skyrt._core.RollingCache; tests/rolling_forcing_reference.py states their loop)."""
    schedule = FewStepSchedule.from_sampling(sampling, shift)
    steps = len(schedule)
    return RolloutSampling(
        sampler="fewstep", step_template=tuple(int(round(float(t))) for t in schedule.timesteps),
        sigmas=(*(float(s) for s in schedule.sigma_x0), 0.0), step_timesteps=tuple(float(t) for t in schedule.timesteps),
        renoise_sigmas=tuple(float(s) for s in schedule.sigma_noise), commit_timestep=float(sampling.context_noise),
        ar_step=steps if rolling_cache is None else 1, recache="longlive" if rolling_cache is None else "recommit",
        rolling_cache=rolling_cache)
