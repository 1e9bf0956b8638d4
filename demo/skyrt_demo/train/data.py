"""Training data: world clips as VAE input, and the encoded training set (stage 2).

The set is world clips of the TRAIN split (a share of them with a prompt switch at a latent-frame
boundary), encoded once by the frozen VAE into model-space latents and stored as fp16 shards under
OUT/data, with the shape's latent mask beside them (the DiT's loss weights).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from skyrt.export.vae import WanVAE, normalize_latents
from skyrt.runtime import latents as lat

from .. import world as W
from .loop import progress_bar
from .masks import latent_fg_mask


def train_clip_pixels(rng: np.random.Generator, size: int, count: int = 8, frames: int = 17) -> torch.Tensor:
    """`count` random train-split world clips of `frames` frames as VAE input [count, 3, frames, S, S]."""
    combos = W.combinations("train")
    clips = [W.render_clip(combos[int(rng.integers(len(combos)))], frames, size, size,
                           seed=int(rng.integers(2**31))).frames for _ in range(count)]
    return to_pixels(np.stack(clips))


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float32 [B, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


@dataclass
class LatentData:
    """The encoded training set: latents fp16 [N, 16, L, h, w], prompts, optional switch."""

    latents: torch.Tensor
    prompts: list[str]
    second_prompts: list[str]  # "" when the clip does not switch
    switch_latent: np.ndarray  # int [N]: first latent frame of the second prompt, -1 without a switch
    fg: torch.Tensor  # uint8 [N, L, h, w]: 1 where the shape is in that latent pixel (from the ground truth)


class LatentShards:
    """The Trainer's data stage (a mixin: uses self.cfg, self.data_dir and self.summary)."""

    def build_data(self, vae: WanVAE) -> LatentData:
        cfg = self.cfg
        shards = math.ceil(cfg.dataset_clips / cfg.shard_clips)
        latents_per_clip = lat.latent_length(cfg.clip_frames)
        missing = [s for s in range(shards) if not self._shard_path(s).is_file()]
        bar = progress_bar(shards, shards - len(missing), "data", cfg.progress)
        for s in missing:
            self._write_shard(vae, s, min(cfg.shard_clips, cfg.dataset_clips - s * cfg.shard_clips), latents_per_clip)
            bar.update(1)
        bar.close()
        parts = [self._load_shard(s) for s in range(shards)]
        data = LatentData(
            latents=torch.from_numpy(np.concatenate([p["latents"] for p in parts])),
            prompts=[str(v) for p in parts for v in p["prompts"]],
            second_prompts=[str(v) for p in parts for v in p["second_prompts"]],
            switch_latent=np.concatenate([p["switch_latent"] for p in parts]),
            fg=torch.from_numpy(np.concatenate([p["fg"] for p in parts])))
        self.summary["data"] = {"clips": len(data.prompts), "switch_clips": int((data.switch_latent >= 0).sum()),
                                "latent_shape": list(data.latents.shape[1:]),
                                "latent_std": float(data.latents[:64].float().std()),
                                "fg_fraction": float(data.fg.float().mean())}
        return data

    def _shard_clips(self, shard: int, count: int, latents_per_clip: int):
        """The shard's clips in order: (clip, second prompt or "", first latent of the second prompt or -1).
        Seeded per shard, so a shard can be rebuilt (or its masks recomputed) identically."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 2, shard])
        combos = W.combinations("train")
        for _ in range(count):
            first = combos[int(rng.integers(len(combos)))]
            second, switch_latent = None, -1
            if rng.random() < cfg.switch_fraction:
                while second is None or second == first:
                    second = combos[int(rng.integers(len(combos)))]
                switch_latent = int(rng.integers(2, latents_per_clip - 1))
            # Latent s covers pixel frames 4s-3 .. 4s: switching at 4s-3 makes latents >= s pure second.
            switch_frame = None if second is None else lat.pixel_length(switch_latent) - 3
            clip = W.render_switch_clip(first, second, switch_frame, cfg.clip_frames, cfg.size, cfg.size,
                                        seed=int(rng.integers(2**31)))
            yield clip, ("" if second is None else second.prompt), switch_latent

    def _shard_path(self, shard: int) -> Path:
        return self.data_dir / f"shard_{shard:05d}.npz"

    def _save_shard(self, shard: int, arrays: dict) -> None:
        path = self._shard_path(shard)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    def _load_shard(self, shard: int) -> dict:
        """A shard's arrays; shards written before the masks existed get theirs from a replay of the world."""
        with np.load(self._shard_path(shard)) as f:
            arrays = dict(f)
        if "fg" not in arrays:
            clips = list(self._shard_clips(shard, len(arrays["prompts"]), arrays["latents"].shape[2]))
            if [c.prompt for c, _, _ in clips] != [str(p) for p in arrays["prompts"]]:
                raise RuntimeError(f"{self._shard_path(shard)} was not written by this world and seed; "
                                   "delete the data folder to rebuild it")
            arrays["fg"] = np.stack([latent_fg_mask(clip, self.cfg.size) for clip, _, _ in clips])
            self._save_shard(shard, arrays)
        return arrays

    @torch.no_grad()
    def _write_shard(self, vae: WanVAE, shard: int, count: int, latents_per_clip: int) -> None:
        prompts, seconds, switches, encoded, masks = [], [], [], [], []
        for clip, second, switch_latent in self._shard_clips(shard, count, latents_per_clip):
            mu = vae.encode(to_pixels(clip.frames[None]))  # [1, 16, L, h, w]
            encoded.append(normalize_latents(mu)[0].half().numpy())
            masks.append(latent_fg_mask(clip, self.cfg.size))
            prompts.append(clip.prompt)
            seconds.append(second)
            switches.append(switch_latent)
        self._save_shard(shard, {"latents": np.stack(encoded), "prompts": np.array(prompts),
                                 "second_prompts": np.array(seconds),
                                 "switch_latent": np.array(switches, dtype=np.int64), "fg": np.stack(masks)})
