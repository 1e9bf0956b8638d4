"""Exact operations on a WanVAE that training needs and inference does not: the affine
re-parametrisation folded into the 1x1x1 convs, and an init that lets a narrow VAE learn. (The
encoder's moments and the unclamped decode are WanVAE's own: encode_moments, decode(clamp=False).)"""
from __future__ import annotations

import math

import torch

from skyrt.export.vae import WanVAE
from skyrt.runtime import latents as lat


@torch.no_grad()
def fold_latent_affine(vae: WanVAE, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Re-parametrise the VAE in place so its raw latent becomes scale * mu + shift ([z] each),
    with decode(new latent) == old decode(mu): exact, the decoder's 1x1x1 conv absorbs the inverse."""
    z = vae.config.z_dim
    w1, b1 = vae.conv1.weight, vae.conv1.bias  # [2z, 2z, 1, 1, 1], [2z]: rows :z give mu, z: log_var
    w1[:z] *= scale.view(z, 1, 1, 1, 1)
    b1[:z] = b1[:z] * scale + shift
    b1[z:] += 2.0 * torch.log(scale)  # the posterior variance scales with the latent
    w2, b2 = vae.conv2.weight, vae.conv2.bias  # [z, z, 1, 1, 1]: decoder input from the raw latent
    inv = 1.0 / scale
    b2 -= (w2[:, :, 0, 0, 0] * inv[None, :]) @ shift
    w2 *= inv.view(1, z, 1, 1, 1)


@torch.no_grad()
def init_vae(vae: WanVAE) -> WanVAE:
    """Initialisation that lets a narrow VAE learn within minutes instead of hours.

    The default conv init shrinks the signal by ~1/sqrt(3) per layer while the biases stay, so
    after the decoder's chain of convs the latent's contribution drowns in bias constants and the
    RMS norms (which only see directions) pass on almost nothing of it: the decoder outputs the
    mean frame and the encoder gets no gradient for hundreds of steps. Here: variance-preserving
    conv weights N(0, 1 / fan_in) with zero biases, residual branches and attention outputs that
    start at zero (identity blocks), and a small initial posterior variance so sampling does not
    drown the latent either.
    """
    from skyrt.export.vae import AttentionBlock, ResidualBlock

    for m in vae.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)):
            m.weight.normal_(0.0, 1.0 / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                m.bias.zero_()
    for m in vae.modules():
        if isinstance(m, ResidualBlock):
            m.residual[6].weight.zero_()
        elif isinstance(m, AttentionBlock):
            m.proj.weight.zero_()
    z = vae.config.z_dim
    vae.conv1.weight[z:].mul_(0.01)
    vae.conv1.bias[z:] = -6.0  # posterior std ~0.05 at first
    return vae


def wan_constants() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed Wan2.1 latent mean and std ([16] each) that the folded VAE's latents are standardised for."""
    return torch.tensor(lat.LATENT_MEAN_VALUES), torch.tensor(lat.LATENT_STD_VALUES)
