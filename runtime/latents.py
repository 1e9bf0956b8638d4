"""Wan2.1 VAE latent normalisation (the official WanVAE's per-channel mean/std) and the frame-count
rules, torch-free: the one definition the runtime, the export side and the demo trainer share.

Model space (what the DiT sees) is z = (mu - mean) / std; the VAE decoder takes mu = z * std + mean.
"""
from __future__ import annotations

import numpy as np

LATENT_CHANNELS = 16
SPATIAL_FACTOR = 8  # VAE downsamples height and width by 8
TEMPORAL_FACTOR = 4  # latent 0 -> 1 pixel frame, each later latent -> 4 pixel frames
PATCH_SPATIAL = 2  # DiT patch (1, 2, 2): latent height/width must be even

# The published constants, exactly as written (diffusers' config holds the same decimals).
LATENT_MEAN_VALUES = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENT_STD_VALUES = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
LATENT_MEAN = np.array(LATENT_MEAN_VALUES, dtype=np.float32)
LATENT_STD = np.array(LATENT_STD_VALUES, dtype=np.float32)
_INV_STD = (1.0 / LATENT_STD).astype(np.float32)


def _per_channel(values: tuple[float, ...], table: np.ndarray, like, channel_axis: int):
    """The 16 constants shaped to broadcast along `channel_axis` of `like`: the float32 table for a
    numpy array, the decimals in like's dtype and device for a torch tensor (the export side and
    the demo trainer; torch is never imported here)."""
    shape = [1] * like.ndim
    shape[channel_axis] = LATENT_CHANNELS
    if isinstance(like, np.ndarray):
        return table.reshape(shape)
    return like.new_tensor(values).reshape(shape)


def normalize(mu, channel_axis: int = 0):
    """Raw VAE mean -> model-space latents (what the DiT sees), the official (mu - mean) * (1 / std).

    mu: numpy [16, F, h, w] (returns float32), or a torch tensor with channels on `channel_axis`
    (e.g. [B, 16, F, h, w] with channel_axis=1; returns its dtype)."""
    inv_std = tuple(1.0 / s for s in LATENT_STD_VALUES)
    z = (mu - _per_channel(LATENT_MEAN_VALUES, LATENT_MEAN, mu, channel_axis)) * _per_channel(
        inv_std, _INV_STD, mu, channel_axis)
    return z.astype(np.float32) if isinstance(z, np.ndarray) else z


def denormalize(z, channel_axis: int = 0):
    """Model-space latents -> raw VAE latents for the decoder: z * std + mean (arrays as `normalize`)."""
    mu = z * _per_channel(LATENT_STD_VALUES, LATENT_STD, z, channel_axis) + _per_channel(
        LATENT_MEAN_VALUES, LATENT_MEAN, z, channel_axis)
    return mu.astype(np.float32) if isinstance(mu, np.ndarray) else mu


def latent_length(num_pixel_frames: int) -> int:
    """Latent frames for a clip of 1 + 4k pixel frames (the official (T - 1) // 4 + 1)."""
    return (num_pixel_frames - 1) // TEMPORAL_FACTOR + 1


def latents_covering(num_pixel_frames: int) -> int:
    """The fewest latent frames whose decode has at least `num_pixel_frames` frames (latent_length
    for 1 + 4k frames)."""
    return -(-(num_pixel_frames - 1) // TEMPORAL_FACTOR) + 1


def pixel_length(num_latent_frames: int) -> int:
    """Pixel frames decoded from `num_latent_frames` latents: 1 + 4 (F - 1)."""
    return 1 + TEMPORAL_FACTOR * (num_latent_frames - 1) if num_latent_frames > 0 else 0
