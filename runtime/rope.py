"""The DiT's position and time tables, torch-free: the one definition both layers use.

- `timestep_sinusoid`: the sinusoidal timestep embedding (cos half first, the official layout).
- `rope_tables` / `rope_cos_sin`: the real form of Wan2.1's 3-D RoPE (cos/sin of each interleaved
  channel pair's angle), temporal pairs first, then height, then width.

Both are computed in float64 and stored float32, like both public versions: at t ~ 1000 fp32
angles would be off by ~1e-4. Neither ever runs inside an exported graph (TensorRT has no float64):
the onnxruntime / TensorRT backends feed them as graph inputs, and the torch reference
(export/dit.py) turns the same numpy tables into tensors. tests/test_dit.py checks the tables
against the official complex formula and the model against diffusers.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

ROPE_THETA = 10000.0
SINUSOID_BASE = 10000.0


def timestep_sinusoid(t: np.ndarray, dim: int) -> np.ndarray:
    """Timesteps [...] -> [..., dim] float32 embedding, cos half first; float64 angles."""
    half = dim // 2
    freqs = np.power(SINUSOID_BASE, -np.arange(half, dtype=np.float64) / half)
    angles = np.asarray(t, dtype=np.float64)[..., None] * freqs
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (t, h, w): channels t = d - 4*(d//6), h = w = 2*(d//6), halved."""
    hw = head_dim // 6
    return head_dim // 2 - 2 * hw, hw, hw


def _axis_inv_freq(pairs: int) -> np.ndarray:
    """Inverse frequencies of one axis, float64 [pairs]: each axis has its own table of 2*pairs channels."""
    return 1.0 / ROPE_THETA ** (np.arange(pairs, dtype=np.float64) * 2 / (2 * pairs))


def rope_tables(head_dim: int, frame_positions: Sequence[int] | np.ndarray, h: int, w: int,
                max_positions: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Real RoPE tables for a (frames, h, w) token grid, tokens in f-major, then h, then w order.

    frame_positions: [f] temporal positions of the frames (any order, e.g. a ring's cached blocks).
    Returns (cos, sin), each float32 [f*h*w, head_dim // 2]: pair i of a token is rotated by the angle
    of its axis (temporal pairs first, then height, then width), exactly the official complex table.
    """
    pos = np.asarray(frame_positions, dtype=np.int64).reshape(-1)
    if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= max_positions):
        raise ValueError(f"frame positions {int(pos.min())}..{int(pos.max())} fall outside the trained RoPE table "
                         f"[0, {max_positions}); rebase the positions")
    if h > max_positions or w > max_positions:
        raise ValueError(f"token grid {h}x{w} exceeds the RoPE table of {max_positions} positions")
    pt, ph, pw = rope_axis_pairs(head_dim)
    f = pos.size
    ang_t = pos.astype(np.float64)[:, None] * _axis_inv_freq(pt)  # [f, pt]
    ang_h = np.arange(h, dtype=np.float64)[:, None] * _axis_inv_freq(ph)  # [h, ph]
    ang_w = np.arange(w, dtype=np.float64)[:, None] * _axis_inv_freq(pw)  # [w, pw]
    angles = np.concatenate([
        np.broadcast_to(ang_t[:, None, None, :], (f, h, w, pt)),
        np.broadcast_to(ang_h[None, :, None, :], (f, h, w, ph)),
        np.broadcast_to(ang_w[None, None, :, :], (f, h, w, pw)),
    ], axis=-1).reshape(f * h * w, head_dim // 2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@functools.lru_cache(maxsize=64)
def rope_cos_sin(head_dim: int, first_position: int, frames: int, h: int, w: int,
                 max_positions: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """`rope_tables` of `frames` consecutive frames from `first_position`, as read-only arrays
    (cached: a rollout asks for the same few position ranges over and over)."""
    positions = np.arange(first_position, first_position + frames, dtype=np.int64)
    cos, sin = rope_tables(head_dim, positions, h, w, max_positions)
    cos.flags.writeable = sin.flags.writeable = False
    return cos, sin
