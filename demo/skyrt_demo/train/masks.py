"""Loss masks from the world's ground truth: where the shape is (grown to take in its anti-aliased
edges), the band along its outline, and both at the latents' resolution."""
from __future__ import annotations

import numpy as np
import torch

from skyrt.runtime import latents as lat

from .. import world as W

SHAPE_GROWTH = 1.4  # the shape grown by 40% takes in its anti-aliased edges (and the VAE's blur of them)
OUTLINE_BAND = 0.15  # half-width of the decoder phase's outline band, relative to the shape's radius


def shape_coverage(clip: W.Clip, size: int, scale: float) -> np.ndarray:
    """float32 [T, S, S] in [0, 1]: the clip's shape per frame at `scale` times its radius, from the
    ground truth; follows a prompt switch's new shape."""
    return np.stack([W.shape_mask(clip.truth.attributes_at(t).shape, size, size, cx, cy, scale * clip.truth.radius)
                     for t, (cx, cy) in enumerate(clip.truth.centers)])


def grown_shape_coverage(clip: W.Clip, size: int) -> np.ndarray:
    """The shape grown by SHAPE_GROWTH: the pixels the VAE and DiT losses weight up."""
    return shape_coverage(clip, size, SHAPE_GROWTH)


def shape_outline_band(clip: W.Clip, size: int, half_width: float = OUTLINE_BAND) -> np.ndarray:
    """float32 [T, S, S] in [0, 1]: a band along the true shape's outline, the shape at (1 + half_width)
    times its radius minus the shape at (1 - half_width) (every world shape is star-shaped about its
    centre, so the difference is >= 0): about +-3 px at the world's radii."""
    return shape_coverage(clip, size, 1.0 + half_width) - shape_coverage(clip, size, 1.0 - half_width)


def latent_fg_mask(clip: W.Clip, size: int) -> np.ndarray:
    """uint8 [L, size/8, size/8]: 1 where the grown shape touches a latent pixel in any of the pixel
    frames that latent frame covers (frame 0, then 4 per latent)."""
    per_frame = grown_shape_coverage(clip, size) > 0.25  # [T, S, S]
    f = lat.SPATIAL_FACTOR
    cells = per_frame.reshape(len(per_frame), size // f, f, size // f, f).any(axis=(2, 4))  # [T, h, w]
    groups = [cells[:1]] + [cells[t : t + lat.TEMPORAL_FACTOR]
                            for t in range(1, len(cells), lat.TEMPORAL_FACTOR)]
    return np.stack([g.any(axis=0) for g in groups]).astype(np.uint8)


def shape_outline(fg: torch.Tensor) -> torch.Tensor:
    """fg float [B, F, h, w] in {0, 1} -> its outline: fg minus its 3x3 erosion (wrapping, like the world)."""
    padded = torch.nn.functional.pad(fg.flatten(0, 1)[:, None], (1, 1, 1, 1), mode="circular")  # [BF, 1, h+2, w+2]
    eroded = -torch.nn.functional.max_pool2d(-padded, kernel_size=3, stride=1)  # [BF, 1, h, w]
    return fg - eroded.view_as(fg)
