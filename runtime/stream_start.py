"""Where a causal-family preset's stream starts from: an image or a short clip, as whole clean blocks.

A preset (runtime/causal_family.py) denoises blocks of `b` latent frames against a KV cache of finished
blocks. A start is committed into that cache as finished blocks (the way the diffusion-forcing path
commits an I2V / V2V prefix, runtime/kvcache.py KVRollout.blocks): the Wan VAE encodes it, the clean
pass writes its K/V, and the first generated block attends to it. The cache holds whole blocks only,
so the start is cut to whole blocks here:

- an image becomes a still clip of 1 + 4(b - 1) frames (the image repeated), which the Wan VAE encodes
  to exactly b latent frames: one block (b = 1: the image alone, Causal-Forcing's frame-wise I2V);
- a clip keeps its last 1 + 4(m b - 1) frames, m the most whole blocks it covers and the ring holds
  (more would be evicted before the first generated block sees them).

The released causal checkpoints were trained on text only (their I2V variants, where one exists, are
other models); the start is context they were never trained to continue, which README says.
"""
from __future__ import annotations

import numpy as np

from .latents import TEMPORAL_FACTOR


def block_pixel_frames(blocks: int, block_frames: int) -> int:
    """Pixel frames whose Wan VAE encoding is `blocks` whole blocks of `block_frames` latent frames."""
    return 1 + TEMPORAL_FACTOR * (blocks * block_frames - 1)


def still_clip(frame: np.ndarray, block_frames: int) -> np.ndarray:
    """uint8 [H, W, 3] -> the still clip [1 + 4(b - 1), H, W, 3] that encodes to one block."""
    return np.repeat(frame[None], block_pixel_frames(1, block_frames), axis=0)


def clip_start(frames: np.ndarray, block_frames: int, max_blocks: int) -> np.ndarray:
    """The last frames of a clip [T, H, W, 3] that encode to whole blocks: the most blocks T covers,
    at most `max_blocks` (the ring's). Refuses a clip shorter than one block, naming the minimum."""
    need = block_pixel_frames(1, block_frames)
    if len(frames) < need:
        raise ValueError(f"the start video has {len(frames)} frame(s); a preset with blocks of {block_frames} latent "
                         f"frame(s) needs at least {need} (1 + 4({block_frames} - 1)) to start from, or pass "
                         "image= for a single frame")
    covered = (1 + (len(frames) - 1) // TEMPORAL_FACTOR) // block_frames
    blocks = max(1, min(covered, max_blocks))
    return frames[-block_pixel_frames(blocks, block_frames):]


__all__ = ["block_pixel_frames", "clip_start", "still_clip"]
