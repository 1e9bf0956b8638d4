"""Rolling-Forcing's rollout, restated in numpy around skyrt's torch DiT reference, driven by recorded draws.

The oracle its result is checked against is tests/fixtures/causal_family/rolling_forcing.npz, written by
tests/causal_family_reference.py from their own code (TencentARC/RollingForcing at the commit in
recipes.json: pipeline/rolling_forcing_inference.py `inference_rolling_forcing`, the self-attention of
wan/modules/causal_model.py). This file is frozen: it is what skyrt's rollout core must reproduce when it
runs Rolling-Forcing, not a second implementation to maintain. What their code does, per call (L = number
of denoising steps = 5 blocks in the rolling window, b = 3 frames per block, N blocks, timesteps
t_0 = 1000 > t_1 > ... > t_4 of the warped list):

Windows. For w = 0 .. N + L - 2 one DiT call denoises blocks s = max(0, w - L + 1) .. e = min(N - 1, w),
block j at step w - j: the newest block starts from its initial noise at t_0, the oldest is at t_4 (its
last step), so the timesteps across the window are staggered, one step apart, t_4 .. t_0 from oldest to
newest (fewer blocks in the first L - 1 and the last L - 1 windows). The call returns x0 for every block
(x0 = x - sigma(t) v per frame, float64, sigma looked up on their 1000-step grid); each block not at its
last step is re-noised to its next timestep, (1 - sigma) x0 + sigma z in float32, z = the block's frames
of one torch.randn_like over the WHOLE window's x0 (one draw per re-noised block, oldest block first;
the fixture keeps each draw's slice). A block's output is its x0 from its last window.

Attention in a window call (no mask: every query sees every key listed):
- s = 0: the window's own tokens only;
- s >= 1: [sink ; working ; window]: the sink is block 0's clean keys/values, its keys rotated at
  frames p .. p + b - 1 with p = 3s - 3W - 3, right before the working blocks (their cache keeps the
  sink's keys unrotated and rotates them at each call: the sink moves along with the window); working =
  the W = min(s - 1, (21 - n * 3 - 3) / 3) clean blocks just before s (n = blocks in the window; 21 frames
  is their max_attention_size), keys rotated at their own absolute frames; window queries and keys at
  their absolute frames 3s ...

Clean pass (their "rerun with timestep zero to update the clean cache"): after every window, block s's x0
(the window's OLDEST block; t = context_noise = 0 for its frames, at its absolute frames) runs once more;
each layer's keys/values of it go into their cache (block 0: the sink, keys stored unrotated; later
blocks: keys rotated at their absolute frames). Its attention: s = 0: itself only; s >= 1: the cache
after the write, [sink at frames 0..2 ; blocks 1 .. s] while that is at most 21 frames (7 blocks), and
once their 24-frame cache holds more than 7 blocks, its last 7 blocks (blocks s - 6 .. s) without the
sink. Block 0 is the first block of windows 0 .. L - 1: its last clean pass (window L - 1) is at its final
x0. Every later block is first only in the window of its last step, so each block's cached K/V come
from its final x0. The denoise call also writes its first block's noisy K/V into the cache (their
num_new_tokens bookkeeping and the eviction that keeps the sink and shifts the rest happen there), but
the clean pass overwrites that slot before anything reads it, so it is not restated.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from skyrt.export.dit import BlockOps, CrossKV, WanDiT, apply_rope, rope_cos_sin

BLOCK_FRAMES = 3  # their block_length (3 * 1560 tokens, hard-coded; their config's num_frame_per_block is 3)
ATTENTION_FRAMES = 21  # their max_attention_size, in frames
CACHE_FRAMES = 24  # their kv_cache_clean size, in frames (1560 * 24 tokens)


@dataclass(frozen=True)
class Variant:
    """What a test changes to show the fixture tells the semantics apart (the defaults are theirs)."""

    sink_follows_window: bool = True  # False: the sink's keys stay at frames 0..2
    window_attention: str = "full"  # "block-causal": a window block sees only itself and older blocks
    clean_pass_loses_sink: bool = True  # False: the clean pass attends to the sink however full the cache


class _RollingOps(BlockOps):
    """A pass's self-attention: [keys put in front (sink, cached blocks) ; the pass's own], no mask
    unless the variant asks; keeps each layer's own (rotated) keys and values, and, when asked, the
    unrotated keys (what their cache stores for the sink)."""

    def __init__(self, cos, sin, front, mask=None, keep_unrotated: bool = False):
        super().__init__(cos, sin, mask)
        self.front = front  # layer -> (keys, values) [1, S, N, Dh], or None
        self.keep_unrotated = keep_unrotated
        self.new_k, self.new_v, self.raw_k = [], [], []

    def self_attention(self, layer, attn, h):
        if self.keep_unrotated:
            unit_cos, unit_sin = torch.ones_like(self.cos), torch.zeros_like(self.sin)  # exactly no rotation
            self.raw_k.append(attn.project_qkv(h.flatten(1, 2), unit_cos, unit_sin)[1])
        return super().self_attention(layer, attn, h)

    def keys_values(self, layer):
        def extend(k, v):
            self.new_k.append(k)
            self.new_v.append(v)
            if self.front is None:
                return k, v
            fk, fv = self.front(layer)
            return torch.cat([fk.to(v.dtype), k], dim=1), torch.cat([fv, v], dim=1)
        return extend


class _CleanCache:
    """Their kv_cache_clean, by block: the sink's unrotated keys + values, every later block's rotated keys + values."""

    def __init__(self, layers: int):
        self.sink: list[tuple[torch.Tensor, torch.Tensor]] = [None] * layers
        self.blocks: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(layers)]

    def sink_at(self, layer: int, first_frame: int, rope) -> tuple[torch.Tensor, torch.Tensor]:
        raw_k, v = self.sink[layer]
        cos, sin = rope(first_frame, BLOCK_FRAMES)
        return apply_rope(raw_k, cos, sin), v

    def front(self, blocks: list[int], sink_frame: int | None, rope):
        """layer -> [sink rotated at sink_frame (if not None) ; the listed blocks' keys/values]."""
        def keys(layer):
            parts = [self.sink_at(layer, sink_frame, rope)] if sink_frame is not None else []
            parts += [self.blocks[layer][j] for j in blocks]
            return torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)
        return keys


def _sigma(grid_timesteps: np.ndarray, grid_sigmas: np.ndarray, t: float, dtype) -> float:
    """Their lookup: the sigma of the grid timestep nearest to t, compared in `dtype`."""
    return grid_sigmas[int(np.argmin(np.abs(grid_timesteps.astype(dtype) - dtype(t))))]


def rolling_forcing_latents(dit: WanDiT, context: np.ndarray, data, variant: Variant = Variant()) -> np.ndarray:
    """Their inference_rolling_forcing on `dit` with the fixture's draws: clean latents [16, F, h, w].

    context: the prompt embedding [text_len, text_dim] (padded, as their text encoder returns it);
    data: the fixture (initial_noise [16, F, h, w], renoise [draws, 16, b, h, w] with renoise_block /
    renoise_step, step_timesteps [L], grid_sigmas / grid_timesteps [1000])."""
    steps = np.asarray(data["step_timesteps"], np.float32)
    grid_t, grid_s = np.asarray(data["grid_timesteps"]), np.asarray(data["grid_sigmas"])
    noise = np.asarray(data["initial_noise"], np.float32)
    L, b = len(steps), BLOCK_FRAMES
    channels, frames, h, w = noise.shape
    N = frames // b
    if frames % b or N < L:
        raise ValueError(f"{frames} latent frames: their loop needs whole blocks of {b} and at least {L} blocks")
    draws = iter(zip(data["renoise"], data["renoise_block"], data["renoise_step"]))
    cfg = dit.config
    with torch.no_grad():
        cross_kv = dit.cross_attention_kv(torch.from_numpy(np.asarray(context, np.float32))[None])
    tokens_h, tokens_w = h // cfg.patch_size[1], w // cfg.patch_size[2]

    def rope(first_frame, count):
        return rope_cos_sin(cfg.head_dim, np.arange(count) + first_frame, tokens_h, tokens_w, cfg.rope_max_positions)

    cache = _CleanCache(cfg.num_layers)
    noisy: dict[int, np.ndarray] = {}
    out = np.zeros_like(noise)
    for window in range(N + L - 1):
        s, e = max(0, window - L + 1), min(N - 1, window)
        blocks = list(range(s, e + 1))
        n = len(blocks)
        x = np.concatenate([noise[:, j * b : (j + 1) * b] if window == j else noisy[j] for j in blocks], axis=1)
        t = np.repeat(steps[[window - j for j in blocks]], b)
        front = None
        if s >= 1:
            work = min(s - 1, max(0, (ATTENTION_FRAMES - n * b - b) // b))
            assert work <= CACHE_FRAMES // b - 2, "their cache no longer holds the working blocks"
            sink_frame = (s - work - 1) * b if variant.sink_follows_window else 0
            front = cache.front(list(range(s - work, s)), sink_frame, rope)
        mask = None
        if variant.window_attention == "block-causal":
            mask = _window_mask(n, b, tokens_h * tokens_w, 0 if front is None else work + 1)
        velocity, _ = _dit_pass(dit, x, t, s * b, cross_kv, front, rope, mask)
        x0 = np.empty_like(x)
        for i, j in enumerate(blocks):  # x0 = x - sigma v per block (its own step), float64 -> float32
            sl = slice(i * b, (i + 1) * b)
            sigma = np.float64(_sigma(grid_t, grid_s, steps[window - j], np.float64))
            x0[:, sl] = (x[:, sl].astype(np.float64) - sigma * velocity[:, sl].astype(np.float64)).astype(np.float32)
            out[:, j * b : (j + 1) * b] = x0[:, sl]
        for i, j in enumerate(blocks):  # oldest first, one draw per block not at its last step
            if window - j == L - 1:
                continue
            z, block, step = next(draws)
            assert (block, step) == (j, window - j + 1), f"draw for block {block} step {step}, expected {j}"
            sigma = np.float32(_sigma(grid_t, grid_s, steps[window - j + 1], np.float32))
            noisy[j] = ((np.float32(1) - sigma) * x0[:, i * b : (i + 1) * b] + sigma * z).astype(np.float32)
        _clean_pass(dit, x0[:, :b], s, cross_kv, cache, rope, variant)
    assert next(draws, None) is None, "draws left over"
    return out


def _clean_pass(dit, x0: np.ndarray, s: int, cross_kv, cache: _CleanCache, rope, variant: Variant) -> None:
    """Block s's x0 at t = 0: its keys/values into the cache (module docstring)."""
    b = BLOCK_FRAMES
    front = None
    if s >= 1:
        held = min(s + 1, CACHE_FRAMES // b)  # blocks in their cache after this write
        if held <= ATTENTION_FRAMES // b:
            front = cache.front(list(range(1, s)), 0, rope)
        else:  # their window of 21 frames over the cache's end, [sink ; 7 most recent] cut to the last 7
            recent = list(range(s - ATTENTION_FRAMES // b + 1, s))
            front = cache.front(recent, None if variant.clean_pass_loses_sink else 0, rope)
    t = np.zeros(b, np.float32)
    _, ops = _dit_pass(dit, x0, t, s * b, cross_kv, front, rope, keep_unrotated=s == 0)
    for layer in range(dit.config.num_layers):
        if s == 0:
            cache.sink[layer] = (ops.raw_k[layer], ops.new_v[layer])
        else:
            cache.blocks[layer][s] = (ops.new_k[layer], ops.new_v[layer])


def _dit_pass(dit: WanDiT, x: np.ndarray, t: np.ndarray, first_frame: int, cross_kv: list[CrossKV], front,
              rope, mask=None, keep_unrotated: bool = False) -> tuple[np.ndarray, _RollingOps]:
    """One DiT call on latents x [16, f, h, w] at per-frame timesteps t [f] from frame `first_frame`:
    WanDiT.forward's steps with the self-attention of _RollingOps. Returns (velocity [16, f, h, w], ops)."""
    with torch.no_grad():
        tokens = dit.patchify(torch.from_numpy(np.ascontiguousarray(x))[None])  # [1, f, S, D]
        e, e0 = dit.embed_time(torch.from_numpy(np.asarray(t, np.float32))[None])
        f = tokens.shape[1]
        cos, sin = rope(first_frame, f)
        ops = _RollingOps(cos, sin, front, mask, keep_unrotated)
        tokens = dit.run_blocks(tokens, e0, cross_kv, ops)
        grid = (f, x.shape[2] // dit.config.patch_size[1], x.shape[3] // dit.config.patch_size[2])
        return dit.unpatchify(dit.head(tokens, e), grid)[0].numpy(), ops


def _window_mask(n: int, b: int, tokens_per_frame: int, front_blocks: int) -> torch.Tensor:
    """The block-causal variant's mask [queries, keys]: the front keys visible, the window block-causal."""
    block_of = torch.arange(n).repeat_interleave(b * tokens_per_frame)
    causal = block_of[None, :] <= block_of[:, None]
    front = torch.ones(len(block_of), front_blocks * b * tokens_per_frame, dtype=torch.bool)
    return torch.cat([front, causal], dim=1)
