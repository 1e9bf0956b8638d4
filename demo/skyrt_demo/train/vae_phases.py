"""Stage 1, the VAE: its phases (short clips, long clips, then optionally the decoder alone), their
batches and step loop, and the latent fold that ends every phase but the decoder's.

Pixel L1 reconstruction on world clips, crops around the shape with whole frames every 4th step,
pixels on and around the shape weighted up, plus a small KL term on the posterior (the decoder sees
sampled latents, so it tolerates the DiT's errors). After each phase an exact affine
re-parametrisation is folded into the VAE's 1x1x1 convs so that the fixed Wan2.1 normalisation maps
its latents to zero mean and unit overall variance: the DiT then sees what a real checkpoint's DiT sees.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from skyrt.export.vae import WanVAE, normalize_latents

from .. import world as W
from .checkpoints import load_checkpoint, save_atomic, vae_progress
from .data import to_pixels, train_clip_pixels
from .loop import head_mean, log_record, lr_factor, progress_bar, tail_mean
from .masks import grown_shape_coverage, shape_outline_band
from .vae_ops import fold_latent_affine, init_vae, wan_constants


@dataclass(frozen=True)
class VAEPhase:
    name: str
    steps: int
    frames: int
    batch: int
    crop: int
    lr: float
    decoder_only: bool = False  # encoder (and the latent space) frozen; no re-standardising fold


class VAETraining:
    """The Trainer's VAE stage (a mixin: uses self.cfg, self.ck, self.out, self.summary and VAEChecks)."""

    def _vae_batch(self, rng: np.random.Generator, step: int, phase: VAEPhase) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels [B, 3, T, S, S], loss weights [B, 1, T, S, S]): world clips of the train split,
        cropped around the shape; pixels on and around the shape weigh 1 + vae_fg_weight, and in the
        decoder phase those on the shape's outline vae_edge_weight more."""
        cfg = self.cfg
        # Every 4th step whole frames (backgrounds, and the decoder's attention on full-size latents), with
        # about the same pixel count.
        full = step % 4 == 3 or phase.crop == cfg.size
        batch = max(1, phase.batch * phase.crop**2 // cfg.size**2) if full else phase.batch
        crop = cfg.size if full else phase.crop
        combos = W.combinations("train")
        clips, weights = [], []
        for _ in range(batch):
            attrs = combos[int(rng.integers(len(combos)))]
            clip = W.render_clip(attrs, phase.frames, cfg.size, cfg.size, seed=int(rng.integers(2**31)))
            frames = clip.frames
            mask = grown_shape_coverage(clip, cfg.size)  # [T, S, S]
            weight = 1.0 + cfg.vae_fg_weight * mask
            if phase.decoder_only and cfg.vae_edge_weight:
                weight = weight + cfg.vae_edge_weight * shape_outline_band(clip, cfg.size)
            if crop < cfg.size:
                # Centre the crop near the shape (wrapping like the world), so most crops hold one.
                cx, cy = clip.truth.centers[0] + rng.uniform(-crop / 4, crop / 4, size=2)
                shift = (crop // 2 - int(cy), crop // 2 - int(cx))
                frames = np.roll(frames, shift, axis=(1, 2))[:, :crop, :crop]
                weight = np.roll(weight, shift, axis=(1, 2))[:, :crop, :crop]
            clips.append(frames)
            weights.append(weight)
        return to_pixels(np.stack(clips)), torch.from_numpy(np.stack(weights)[:, None]).float()

    def vae_phases(self) -> list[VAEPhase]:
        cfg = self.cfg
        phases = [VAEPhase("short", cfg.vae_steps, cfg.vae_frames, cfg.vae_batch, cfg.vae_crop, cfg.vae_lr)]
        if cfg.vae_long_steps > 0:
            phases.append(VAEPhase("long", cfg.vae_long_steps, cfg.vae_long_frames, cfg.vae_long_batch,
                                   cfg.vae_long_crop, cfg.vae_long_lr))
        if cfg.vae_decoder_steps > 0:
            phases.append(VAEPhase("decoder", cfg.vae_decoder_steps, cfg.vae_long_frames, cfg.vae_long_batch,
                                   cfg.vae_long_crop, cfg.vae_decoder_lr, decoder_only=True))
        return phases

    def train_vae(self) -> WanVAE:
        """Phase by phase (short clips, then long ones); each ends with the latent fold and a checkpoint
        marked with the phases done. A phase starts with a fresh optimizer and its own warm-up."""
        cfg = self.cfg
        path = self.ck / "vae.pt"
        torch.manual_seed(cfg.seed + 1)
        vae = init_vae(WanVAE(cfg.vae_config()))
        state = load_checkpoint(path) if path.exists() else None
        if state is not None:
            vae.load_state_dict(state["vae"])
        phases_done, summaries = vae_progress(state)
        for index, phase in enumerate(self.vae_phases()):
            if index < phases_done:
                continue
            resume = state if state is not None and not state.get("done") and state.get("phase", 0) == index else None
            summaries.append(self._train_vae_phase(vae, phase, index, resume, path, summaries))
            state = None
        self.summary["vae"] = {**summaries[-1], "phases": summaries}
        return vae.eval()

    def _train_vae_phase(self, vae: WanVAE, phase: VAEPhase, index: int, resume: dict | None, path: Path,
                         earlier: list[dict]) -> dict:
        cfg = self.cfg
        params = list(vae.parameters())
        if phase.decoder_only:  # only what turns latents into pixels learns; the latent space stays
            vae.requires_grad_(False)
            params = [*vae.conv2.parameters(), *vae.decoder.parameters()]
            for p in params:
                p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=phase.lr, betas=(0.9, 0.99), weight_decay=0.0)
        rng = np.random.default_rng([cfg.seed, 1] if index == 0 else [cfg.seed, 1, index])
        gen = torch.Generator().manual_seed(cfg.seed + 11 + 100 * index)
        step, history = 0, []
        probe_start = self._vae_probe(vae, phase)
        if resume is not None:
            opt.load_state_dict(resume["opt"])
            rng.bit_generator.state = resume["rng"]
            gen.set_state(resume["gen"])
            step, history = resume["step"], resume["history"]
            probe_start = resume.get("probe_start", probe_start)
        vae.train()
        bar = progress_bar(phase.steps, step, f"vae ({phase.name} clips)", cfg.progress)
        tic = time.time()
        while step < phase.steps:
            for group in opt.param_groups:
                group["lr"] = phase.lr * lr_factor(step, phase.steps, min(cfg.warmup, phase.steps // 10 + 1))
            x, weight = self._vae_batch(rng, step, phase)  # [B, 3, T, S, S], [B, 1, T, S, S]
            with torch.set_grad_enabled(not phase.decoder_only):
                mu, log_var = vae.encode_moments(x)  # [B, 16, F, S/8, S/8]
            log_var = log_var.clamp(-30.0, 20.0)
            z = mu + torch.exp(0.5 * log_var) * torch.randn(mu.shape, generator=gen)
            recon = vae.decode(z, clamp=False)  # the clamp would stop gradients on overshooting pixels
            rec = ((recon - x).abs() * weight).mean() / weight.mean()
            kl = 0.5 * (mu.square() + log_var.exp() - 1.0 - log_var).mean()
            loss = rec + cfg.vae_kl * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            history.append(rec.item())
            bar.update(1)
            bar.set_postfix(l1=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
            if step % cfg.log_every == 0 or step == phase.steps:
                log_record(self.out, {"stage": "vae", "phase": phase.name, "step": step,
                                      "l1": float(np.mean(history[-cfg.log_every:])), "kl": kl.item(),
                                      "sec_per_step": (time.time() - tic) / cfg.log_every})
                tic = time.time()
            if step % cfg.checkpoint_every == 0 and step < phase.steps:
                save_atomic({"vae": vae.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                             "gen": gen.get_state(), "step": step, "history": history, "phase": index,
                             "phases_done": index, "summaries": earlier, "probe_start": probe_start}, path)
        bar.close()
        vae.eval()
        probe_end = self._vae_probe(vae, phase)
        vae.requires_grad_(True)
        summary = self._decoder_summary(vae, earlier) if phase.decoder_only else self._standardise_latents(vae, rng)
        summary.update(phase=phase.name, frames=phase.frames, steps=step, l1_start=head_mean(history),
                       l1_end=tail_mean(history), probe_l1_start=probe_start, probe_l1_end=probe_end,
                       stationarity=self._stationarity(vae))
        save_atomic({"vae": vae.state_dict(), "done": True, "phases_done": index + 1,
                     "summaries": [*earlier, summary]}, path)
        return summary

    @torch.no_grad()
    def _standardise_latents(self, vae: WanVAE, rng: np.random.Generator) -> dict:
        """Fold an affine into the VAE so the Wan2.1 normalisation gives per-channel zero mean and
        unit overall variance on world clips (one scale for all channels keeps their relative sizes)."""
        cfg = self.cfg
        x = train_clip_pixels(rng, cfg.size)
        mu = vae.encode(x)  # [8, 16, 5, h, w]
        mean_raw = mu.mean(dim=(0, 2, 3, 4))
        std_raw = (mu - mean_raw.view(1, -1, 1, 1, 1)).square().mean().sqrt()
        wan_mean, wan_std = wan_constants()
        # normalised z = (scale mu + shift - mean) / std  ==  (mu - mean_raw) / std_raw
        scale = wan_std / std_raw
        shift = wan_mean - scale * mean_raw
        before = vae.decode(mu[:1])
        fold_latent_affine(vae, scale, shift)
        mu2 = vae.encode(x)
        after = vae.decode(mu2[:1])
        z = normalize_latents(mu2)
        return {"latent_std_raw": float(std_raw), "fold_max_abs_diff": float((after - before).abs().max()),
                "normalised_mean": float(z.mean()), "normalised_std": float(z.std()),
                "recon_l1_128": float((vae.decode(mu2) - x).abs().mean())}
