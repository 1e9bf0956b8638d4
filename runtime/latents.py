"""Wan2.1 VAE latent normalisation (the official WanVAE's per-channel mean/std), torch-free so
every backend shares it.

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


def _per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    # Channels lead ([16, F, h, w]); broadcast over the trailing axes.
    return values.reshape((LATENT_CHANNELS,) + (1,) * (ndim - 1))


def normalize(mu: np.ndarray) -> np.ndarray:
    """Raw VAE mean [16, F, h, w] -> model-space latents (official: (mu - mean) * (1 / std))."""
    inv_std = (1.0 / LATENT_STD).astype(np.float32)
    return ((mu - _per_channel(LATENT_MEAN, mu.ndim)) * _per_channel(inv_std, mu.ndim)).astype(np.float32)


def denormalize(z: np.ndarray) -> np.ndarray:
    """Model-space latents [16, F, h, w] -> raw VAE latents for the decoder."""
    return (z * _per_channel(LATENT_STD, z.ndim) + _per_channel(LATENT_MEAN, z.ndim)).astype(np.float32)


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
