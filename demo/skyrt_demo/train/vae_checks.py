"""Measurements of the VAE during training (what the model card reports): a fixed probe batch's L1,
the whole-frame L1 after the decoder phase, and stationarity on a long still clip."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from skyrt.export.vae import WanVAE

from .. import world as W
from .data import to_pixels, train_clip_pixels

if TYPE_CHECKING:
    from .vae_phases import VAEPhase


class VAEChecks:
    """Mixin of the Trainer: uses self.cfg and VAETraining._vae_batch."""

    @torch.no_grad()
    def _decoder_summary(self, vae: WanVAE, earlier: list[dict]) -> dict:
        """The decoder phase leaves the latent space alone: the last fold's latent statistics still hold.
        The whole-frame L1 is measured again on 8 fixed 17-frame train clips, a draw of its own (so it
        does not compare with the fold's recon_l1_128, which saw other clips)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1, 99])
        x = train_clip_pixels(rng, cfg.size)
        kept = {k: earlier[-1][k] for k in ("latent_std_raw", "normalised_mean", "normalised_std") if k in earlier[-1]}
        return {**kept, "recon_l1_128": float((vae.decode(vae.encode(x)) - x).abs().mean())}

    @torch.no_grad()
    def _stationarity(self, vae: WanVAE) -> dict:
        """A still scene must give one latent and one decoded frame for every chunk after the first few:
        mean |mu_i - mu_last| over the latent frames of a 49-frame still clip, relative to mean |mu|,
        and the decoded clip's L1 in its first and last 16 frames."""
        attrs = W.Attributes("circle", "red", "still", "dark blue", "none")
        x = to_pixels(W.render_clip(attrs, 49, self.cfg.size, self.cfg.size, seed=0).frames[None])
        mu = vae.encode(x)  # [1, 16, 13, h, w]
        drift = (mu - mu[:, :, -1:]).abs().mean(dim=(0, 1, 3, 4)) / mu.abs().mean()
        err = (vae.decode(mu) - x).abs().mean(dim=(0, 1, 3, 4))  # [49]
        return {"latent_drift_per_frame": [round(float(v), 4) for v in drift],
                "decoded_l1_first16": float(err[:16].mean()), "decoded_l1_last16": float(err[-16:].mean())}

    @torch.no_grad()
    def _vae_probe(self, vae: WanVAE, phase: VAEPhase) -> float:
        """L1 of a fixed batch through encode -> decode (no sampling): comparable across steps."""
        x, _ = self._vae_batch(np.random.default_rng([self.cfg.seed, 9]), 0, phase)
        was_training = vae.training
        loss = float((vae.decode(vae.encode(x)) - x).abs().mean())
        vae.train(was_training)
        return loss
