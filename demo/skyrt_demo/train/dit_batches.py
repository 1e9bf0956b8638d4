"""Stage 3's batches: diffusion forcing with rectified flow, as the runtime samples it.

x_sigma = (1 - sigma) x0 + sigma noise, target velocity noise - x0, timestep t = 1000 sigma per frame.
Crops of a few latent frames; a block size per batch and an independent noise level per block
(sometimes all equal, sometimes sorted so later blocks are noisier, as in the DF schedule); leading
blocks are often clean context at t = 0 with no loss (what a KV cache commits). Crops that do not
start at latent 0 always begin with clean context: the first latent of a video is a single encoded
frame and only a block with no history may be one. Prompt-switch crops keep the blocks before the
switch as clean context and are conditioned on the new prompt (what a stream sees after set_prompt).
"""
from __future__ import annotations

import numpy as np
import torch

from .data import LatentData
from .masks import shape_outline


def weighted_flow_loss(v: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared velocity error [B, 16, F, h, w] over channels, then weighted by [B, F, h, w]."""
    err = (v - target).square().mean(dim=1)  # [B, F, h, w]
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


class DiTBatches:
    """Mixin of the Trainer: uses self.cfg."""

    def _dit_batch(self, data: LatentData, rng: np.random.Generator, gen: torch.Generator):
        """One diffusion-forcing batch: (x_sigma [B, 16, F, h, w], t [B, F], target [B, 16, F, h, w],
        loss weight [B, F, h, w] (0 on clean context, 1 + dit_fg_weight on the shape), prompts [B], block size)."""
        cfg = self.cfg
        crop = int(rng.choice(cfg.crop_choices))
        block = int(rng.choice([b for b in cfg.block_choices if crop % b == 0]))
        n_blocks = crop // block
        batch = max(1, cfg.dit_batch_frames // crop)
        x0s, fgs, sigmas, weights, prompts = [], [], [], [], []
        for _ in range(batch):
            i, start, ctx_blocks, prompt = self._pick_crop(data, rng, crop, block)
            x0s.append(data.latents[i, :, start : start + crop].float())
            fgs.append(data.fg[i, start : start + crop].float())
            noisy = n_blocks - ctx_blocks
            u = rng.uniform(size=noisy)
            mode = rng.random()
            if mode < 0.25:
                u[:] = u[0]  # synchronous: every block at the same level (ar_step = 0)
            elif mode < 0.65:
                u = np.sort(u)  # later blocks noisier: the DF schedule with ar_step > 0
            sig = cfg.train_shift * u / (1.0 + (cfg.train_shift - 1.0) * u)
            per_block = np.concatenate([np.zeros(ctx_blocks), sig])
            sigmas.append(np.repeat(per_block, block))
            weights.append(np.repeat(np.r_[np.zeros(ctx_blocks), np.ones(noisy)], block))
            prompts.append("" if rng.random() < cfg.empty_prompt else prompt)
        x0 = torch.stack(x0s)  # [B, 16, F, h, w]
        sigma = torch.tensor(np.stack(sigmas), dtype=torch.float32)  # [B, F]
        noise = torch.randn(x0.shape, generator=gen)
        s5 = sigma[:, None, :, None, None]
        x_t = (1.0 - s5) * x0 + s5 * noise  # rectified flow, as runtime/scheduler.py samples it
        target = noise - x0  # the velocity the sampler integrates: x0 = x - sigma v
        frame_weight = torch.tensor(np.stack(weights), dtype=torch.float32)  # [B, F]
        fg = torch.stack(fgs)  # [B, F, h, w]
        weight = frame_weight[:, :, None, None] * (1.0 + cfg.dit_fg_weight * fg + cfg.dit_edge_weight * shape_outline(fg))
        return x_t, sigma * 1000.0, target, weight, prompts, block

    def _pick_crop(self, data: LatentData, rng: np.random.Generator, crop: int, block: int):
        """(clip index, first latent frame, clean context blocks, prompt) of one training crop."""
        n_blocks = crop // block
        total = data.latents.shape[2]
        switching = np.flatnonzero(data.switch_latent >= 0)
        for _ in range(1000):
            forced = (self.cfg.switch_crop_share and n_blocks > 1 and len(switching)
                      and rng.random() < self.cfg.switch_crop_share)
            i = int(rng.choice(switching)) if forced else int(rng.integers(len(data.prompts)))
            s = int(data.switch_latent[i])
            if s >= 0 and n_blocks > 1 and (forced or rng.random() < 0.7):
                # Clean history under the old prompt, new-prompt blocks to denoise: a stream after set_prompt.
                ctx_blocks = int(rng.integers(1, n_blocks))
                start = s - ctx_blocks * block
                if 0 <= start and start + crop <= total:
                    return i, start, ctx_blocks, data.second_prompts[i]
                continue
            limit = (s if s >= 0 else total) - crop  # an ordinary crop stays before any switch
            if limit < 0:
                continue
            if self.cfg.text_only_share and rng.random() < self.cfg.text_only_share:
                return i, 0, 0, data.prompts[i]
            start = 0 if (rng.random() < 0.35 or limit == 0) else int(rng.integers(1, limit + 1))
            if start > 0:
                if n_blocks == 1:
                    start = 0  # a lone block after the start would have to be context only
                else:
                    # Not the video's first latent: a block with no history must not be trained here.
                    return i, start, int(rng.integers(1, n_blocks)), data.prompts[i]
            ctx_blocks = 0 if (n_blocks == 1 or rng.random() < 0.6) else int(rng.integers(1, n_blocks))
            return i, start, ctx_blocks, data.prompts[i]
        return i, 0, 0, data.prompts[i]  # a tiny data set with no valid crop: the clip's start will do
