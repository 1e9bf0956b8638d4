"""The settings of a training run: every knob in one dataclass, the checks that refuse bad ones, and
the command line that gives a run's settings back (what its model card prints under "reproduce").

The CLI flag of field `foo_bar` is `--foo-bar` (`flag`); cli.py builds its parser from the fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from skyrt.export.dit import DiTConfig
from skyrt.export.vae import VAEConfig
from skyrt.runtime import latents as lat

PROG = "python -m skyrt_demo.train"


def flag(name: str) -> str:
    """The command-line flag of config field `name`: `foo_bar` -> `--foo-bar`."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Every knob of a run; the CLI flag of `foo_bar` is `--foo-bar`."""

    out: Path = Path("demo-model")  # work folder: checkpoints, encoded data, logs (and the model by default)
    model_out: str = ""  # where the model folder goes ("" = OUT/model)
    seed: int = 0
    resume: bool = False
    threads: int = 1  # torch intra-op threads (2 only pays on an otherwise idle 2-core machine)
    size: int = 128  # training / evaluation frame size (square)
    # VAE
    vae_dim: int = 8  # WanVAE base width
    vae_res_blocks: int = 1  # residual blocks per stage
    # VAE phase 1 (short clips)
    vae_steps: int = 2000
    vae_batch: int = 8  # clips per step (fewer when whole frames: about the same pixel count)
    vae_frames: int = 9
    vae_crop: int = 48  # crop side around the shape; whole frames every 4th step
    vae_fg_weight: float = 2.0  # pixels on and around the shape weigh 1 + this (in every phase)
    vae_lr: float = 1e-3
    vae_kl: float = 1e-4  # weight of the KL term on the posterior (every phase)
    # VAE phase 2 (long clips): a causal VAE trained on short clips only is not stationary (every
    # conv it learned saw the zero padding of the clip start); 33-frame clips teach it the steady state.
    vae_long_steps: int = 500  # 0: no long phase
    vae_long_frames: int = 33  # also the decoder phase's clips
    vae_long_batch: int = 3  # also the decoder phase's
    vae_long_crop: int = 48  # also the decoder phase's
    vae_long_lr: float = 3e-4
    # VAE phase 3 (decoder only, on long clips): sharper shapes without moving the latent space, so
    # encoded data and a DiT trained on it stay valid. The outline band (where a cross's notches and
    # every corner live, and where a narrow decoder blurs) weighs vae_edge_weight more.
    vae_decoder_steps: int = 0
    vae_decoder_lr: float = 3e-4
    vae_edge_weight: float = 0.0
    # data
    dataset_clips: int = 1536  # train-split clips, encoded once by the trained VAE
    clip_frames: int = 49
    switch_fraction: float = 0.2  # share of clips whose prompt switches at a latent-frame boundary
    shard_clips: int = 64  # clips per OUT/data shard file
    # text encoder (tiny umT5)
    text_dim: int = 64  # d_model, also the DiT's text_dim
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 128
    text_len: int = 32  # tokens of text context
    text_lr: float = 1e-4
    # DiT (WanDiT, patch (1, 2, 2))
    dit_dim: int = 128
    dit_layers: int = 4
    dit_heads: int = 4
    dit_ffn: int = 512
    freq_dim: int = 64  # sinusoidal timestep embedding width
    num_frame_per_block: int = 2  # written to config.json: the causal block size the runtime uses
    dit_steps: int = 6000
    dit_batch_frames: int = 64  # latent frames per batch (8 crops of 8, 16 of 4, 5 of 12)
    crop_frames: str = "4,8,8,12"  # crop lengths in latent frames, drawn per batch
    block_sizes: str = "2,2,1"  # causal block sizes, drawn per batch (must divide the crop)
    dit_lr: float = 3e-4
    # The shape covers ~4% of a frame: with a flat loss the DiT learns backgrounds and pans and leaves the
    # shape (colour, form, motion: most of a prompt) for last. Latent pixels on the shape weigh 1 + this.
    dit_fg_weight: float = 4.0
    # Every shape's interior is one flat colour: only its outline says which shape it is. Latent pixels on
    # the outline (the shape mask minus its 3x3 erosion) weigh this much more on top of dit_fg_weight.
    dit_edge_weight: float = 0.0
    # Extra share of crops that are a stream's start with no context (the text alone must say what to draw):
    # with the ordinary mix (~21% such crops) the DiT learns to copy its context and ignores the shape word.
    text_only_share: float = 0.0
    # Extra share of crops that are a prompt switch (clean old-prompt context, new-prompt blocks to denoise), on
    # top of the ~14% the ordinary mix draws: what a stream sees after set_prompt, where it must stop copying
    # its context's shape and draw the new one.
    switch_crop_share: float = 0.0
    # Start the DiT and text encoder from another run's dit.pt (its EMA weights); "" = scratch. A shallower
    # DiT is grown to --dit-layers exactly (grown_dit_state: identity blocks between the trained ones).
    dit_init: str = ""
    warmup: int = 200
    train_shift: float = 2.0  # sigma = s u / (1 + (s - 1) u), u ~ U(0, 1): a bit more weight on noise
    empty_prompt: float = 0.1
    ema: float = 0.999
    # bookkeeping
    checkpoint_every: int = 250
    log_every: int = 25
    eval_clips: int = 0  # held-out prompts per setting of the final sweep (0: no sweep)
    # The classifier-free guidance scale recommended when there is no sweep (chosen with
    # benchmarks/quality.py: its shape grid and prompt switches, which the sweep does not measure).
    recommend_guidance: float = 1.0
    progress: bool = True

    @property
    def crop_choices(self) -> list[int]:
        return [int(v) for v in self.crop_frames.split(",")]

    @property
    def block_choices(self) -> list[int]:
        return [int(v) for v in self.block_sizes.split(",")]

    def vae_config(self) -> VAEConfig:
        return VAEConfig(dim=self.vae_dim, num_res_blocks=self.vae_res_blocks)

    def dit_config(self) -> DiTConfig:
        return DiTConfig(dim=self.dit_dim, ffn_dim=self.dit_ffn, num_heads=self.dit_heads, num_layers=self.dit_layers,
                         freq_dim=self.freq_dim, text_dim=self.text_dim, text_len=self.text_len,
                         num_frame_per_block=self.num_frame_per_block)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["out"] = str(self.out)
        return out


# Fields that change what is being trained: a resumed run must not change them.
ARCHITECTURE_FIELDS = ("seed", "size", "vae_dim", "vae_res_blocks", "vae_frames", "vae_long_frames", "dataset_clips",
                       "clip_frames", "switch_fraction", "shard_clips", "text_dim", "text_layers", "text_heads", "text_ffn",
                       "text_len", "dit_dim", "dit_layers", "dit_heads", "dit_ffn", "freq_dim", "num_frame_per_block")


def validate(cfg: TrainConfig) -> None:
    """Refuse settings that cannot train: a ValueError naming the flag and what it must be."""
    unit = lat.SPATIAL_FACTOR * lat.PATCH_SPATIAL
    if cfg.size % unit or cfg.size < 32:
        raise ValueError(f"--size {cfg.size} must be a multiple of {unit} and >= 32")
    for name in ("vae_crop", "vae_long_crop"):
        if getattr(cfg, name) % unit or getattr(cfg, name) > cfg.size:
            raise ValueError(f"{flag(name)} {getattr(cfg, name)} must be a multiple of {unit} and <= --size")
    for name in ("vae_frames", "vae_long_frames", "clip_frames"):
        if (getattr(cfg, name) - 1) % lat.TEMPORAL_FACTOR:
            raise ValueError(f"{flag(name)} must be 1 + 4k frames")
    latents = lat.latent_length(cfg.clip_frames)
    for crop in cfg.crop_choices:
        if crop > latents:
            raise ValueError(f"crop of {crop} latent frames is longer than a {cfg.clip_frames}-frame clip ({latents})")
        if not any(crop % b == 0 for b in cfg.block_choices):
            raise ValueError(f"no block size in {cfg.block_sizes} divides a crop of {crop} latent frames")
    if cfg.num_frame_per_block not in cfg.block_choices:
        raise ValueError(f"num_frame_per_block={cfg.num_frame_per_block} must be one of the trained block sizes")
    for name in ("switch_fraction", "empty_prompt", "text_only_share", "switch_crop_share"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{flag(name)} {getattr(cfg, name)} is a share: give a value in [0, 1]")


def reproduce_command(cfg: TrainConfig) -> str:
    """The training command line of `cfg`: the seed, then every setting that differs from the defaults
    (paths and thread counts left out: where and how fast it ran, not what it trained)."""
    defaults = TrainConfig()
    flags = [f"--seed {cfg.seed}"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in ("seed", "out", "model_out", "resume", "progress", "threads") or value == getattr(defaults, f.name):
            continue
        if f.name == "dit_init":
            value = Path(value).name
        name = flag(f.name)
        flags.append(name if value is True else "--no-" + name[2:] if value is False else f"{name} {value}")
    return f"{PROG} --out DIR " + " ".join(flags)
