"""Train skyrt's demo model on the procedural world, on a CPU, and save it in the official layout.

    python -m skyrt_demo.train --out DIR [--seed S] [--resume] [--vae-steps N] [--dit-steps N] ...

The model is the real architecture at a small size: the Wan2.1 VAE class (WanVAE, base width 8),
the SkyReels-V2 / Wan2.1 DiT class (WanDiT, dim 128, 4 layers, patch (1, 2, 2)) and a tiny umT5
encoder (transformers' UMT5EncoderModel) with a word-level tokenizer that holds every world word.
DIR/model is an ordinary official-layout folder: config.json, model.safetensors, Wan2.1_VAE.pth,
models_t5_umt5-xxl-enc-bf16.pth (fp32 despite the name: the name is what the loaders look for),
google/umt5-xxl/ (tokenizer), plus model_card.md and demo_model.json. `skyrt.load(DIR/model)` runs it.

Stages (each checkpointed with its optimizer state; `--resume` continues where a run stopped):
1. VAE: pixel L1 reconstruction on world clips (9 frames; 48 x 48 crops around the shape with
   whole 128 x 128 frames every 4th step; pixels on and around the shape weigh 3x, as they are few)
   plus a small KL term on the posterior (the decoder sees sampled latents, so it tolerates the
   DiT's errors), with a variance-preserving init (see `init_vae`) without which a VAE this narrow
   sits at the mean frame for hundreds of steps. Afterwards an exact affine
   re-parametrisation is folded into the VAE's 1x1x1 convs (conv1 rows of mu, conv2 columns) so
   that the fixed Wan2.1 normalisation of runtime/latents.py maps its latents to zero mean and
   unit overall variance: the DiT then sees what a real checkpoint's DiT sees.
2. Data: world clips of the TRAIN split (49 frames, 20% with a prompt switch at a latent-frame
   boundary), encoded once by the frozen VAE into model-space latents (fp16 shards under DIR/data).
3. DiT + text encoder, diffusion forcing with rectified flow, as the runtime samples it
   (runtime/scheduler.py): x_sigma = (1 - sigma) x0 + sigma noise, target velocity noise - x0,
   timestep t = 1000 sigma per frame. Crops of 4, 8 or 12 latent frames; a block size per batch
   (2 or 1: num_frame_per_block = 2 in config.json turns skyrt's causal attention on; block 1 is
   trained too so causal_block_size=1 also works) and an independent noise level per block
   (sometimes all equal, sometimes sorted so later blocks are noisier, as in the DF schedule);
   leading blocks are often clean context at t = 0 with no loss (what a KV cache commits). Crops that
   do not start at latent 0 always begin with clean context: the first latent of a video is a
   single encoded frame and only a block with no history may be one. Prompt-switch clips keep the
   blocks before the switch as clean context and are conditioned on the new prompt (what a
   stream sees after set_prompt; --switch-crop-share draws more of them). 10% empty prompts train the unconditional branch for CFG.
   AdamW with warm-up and cosine decay; EMA weights are what gets saved.
4. Export DIR/model and write its model card; 5. optionally (`--eval-clips N`) score held-out
   prompts with the detector over a small shift / guidance sweep and record the best as the
   recommended sampling settings.

Smoke run (tests/test_demo_train.py does this): --vae-steps 3 --dataset-clips 4 --dit-steps 3 --size 64.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import string
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from skyrt.runtime import latents as lat
from skyrt.runtime.model_folder import OFFICIAL_T5, OFFICIAL_TOKENIZER, OFFICIAL_VAE

from skyrt.export.dit import DiTConfig, WanDiT
from skyrt.export.text_encoder import TextEncoder, load_tokenizer, umt5_config_for_official
from skyrt.export.tiny import umt5_official_state_dict
from skyrt.export.vae import CacheIO, VAEConfig, WanVAE
from . import world as W

MODEL_NAME = "skyrt-demo-world-v6"
CARD_NAME = "model_card.md"
META_NAME = "demo_model.json"
MAX_MODEL_BYTES = 30 * 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Configuration


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
    vae_dim: int = 8
    vae_res_blocks: int = 1
    vae_steps: int = 2000
    vae_batch: int = 8
    vae_frames: int = 9
    vae_crop: int = 48
    vae_fg_weight: float = 2.0
    vae_lr: float = 1e-3
    vae_kl: float = 1e-4
    # VAE phase 2 (long clips): a causal VAE trained on short clips only is not stationary (every
    # conv it learned saw the zero padding of the clip start); 33-frame clips teach it the steady state.
    vae_long_steps: int = 500
    vae_long_frames: int = 33
    vae_long_batch: int = 3
    vae_long_crop: int = 48
    vae_long_lr: float = 3e-4
    # VAE phase 3 (decoder only, on long clips): sharper shapes without moving the latent space, so
    # encoded data and a DiT trained on it stay valid. The outline band (where a cross's notches and
    # every corner live, and where a narrow decoder blurs) weighs vae_edge_weight more.
    vae_decoder_steps: int = 0
    vae_decoder_lr: float = 3e-4
    vae_edge_weight: float = 0.0
    # data
    dataset_clips: int = 1536
    clip_frames: int = 49
    switch_fraction: float = 0.2
    shard_clips: int = 64
    # text encoder (tiny umT5)
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 128
    text_len: int = 32
    text_lr: float = 1e-4
    # DiT
    dit_dim: int = 128
    dit_layers: int = 4
    dit_heads: int = 4
    dit_ffn: int = 512
    freq_dim: int = 64
    num_frame_per_block: int = 2
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


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m skyrt_demo.train",
                                description="train skyrt's demo model on the procedural world (CPU)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            if value:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false")
            else:
                p.add_argument(flag, dest=f.name, action="store_true")
        else:
            p.add_argument(flag, dest=f.name, type=type(value), default=value, help=f"default {value}")
    args = p.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    unit = lat.SPATIAL_FACTOR * lat.PATCH_SPATIAL
    if cfg.size % unit or cfg.size < 32:
        raise ValueError(f"--size {cfg.size} must be a multiple of {unit} and >= 32")
    for name in ("vae_crop", "vae_long_crop"):
        if getattr(cfg, name) % unit or getattr(cfg, name) > cfg.size:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be a multiple of {unit} and <= --size")
    for name in ("vae_frames", "vae_long_frames", "clip_frames"):
        if (getattr(cfg, name) - 1) % lat.TEMPORAL_FACTOR:
            raise ValueError(f"--{name.replace('_', '-')} must be 1 + 4k frames")
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
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is a share: give a value in [0, 1]")


# ----------------------------------------------------------------------------------------------
# Tokenizer: every world word is one piece


def make_world_tokenizer(out_dir: str | Path) -> Path:
    """A T5-style Unigram tokenizer whose pieces are the world's words (one piece each) plus single
    characters as a fallback, so any English prompt still tokenizes. Built from a fixed list, no
    training: the same folder every time. Loads with `load_tokenizer` / AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2
    words = W.vocabulary()
    pieces = [(s, 0.0) for s in specials]
    # Whole words score far above any split into characters, so Viterbi always keeps them whole.
    pieces += [(w if w in string.punctuation else "\u2581" + w, -2.0) for w in words]
    seen = {p for p, _ in pieces}
    fallback = ["\u2581"] + list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
    pieces += [(c, -10.0) for c in fallback if c not in seen]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, padding_side="right")
    out_dir = Path(out_dir)
    fast.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"  # resolvable by transformers 4.x and 5.x alike
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out_dir


# ----------------------------------------------------------------------------------------------
# Small helpers


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint (ours, or a user's --dit-init) read without running code: tensors, numbers,
    strings and containers only (weights_only), so a crafted pickle cannot execute anything."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0]
        raise ValueError(f"{path} is not a skyrt training checkpoint (tensors and numbers only): {first_line}") from err


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _train_clip_pixels(rng: np.random.Generator, size: int, count: int = 8, frames: int = 17) -> torch.Tensor:
    """`count` random train-split world clips of `frames` frames as VAE input [count, 3, frames, S, S]."""
    combos = W.combinations("train")
    clips = [W.render_clip(combos[int(rng.integers(len(combos)))], frames, size, size,
                           seed=int(rng.integers(2**31))).frames for _ in range(count)]
    return _to_pixels(np.stack(clips))


def _to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float32 [B, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def encode_moments(vae: WanVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`WanVAE.encode` that also returns the log-variance: video [B, 3, T, H, W] ->
    (mu, log_var), each [B, z, F, H/8, W/8]. mu equals `vae.encode(video)` exactly (same chunking)."""
    step = vae.config.temporal_factor
    b, _, num_frames, height, width = video.shape
    caches = vae.encoder_cache_init(b, height, width, video.dtype, video.device)
    chunks = [video[:, :, :1]] + [video[:, :, i : i + step] for i in range(1, num_frames, step)]
    out = []
    for i, chunk in enumerate(chunks):
        io = CacheIO(caches, first=i == 0)
        out.append(vae.encoder(chunk, io))
        caches = io.new
    mu, log_var = vae.conv1(torch.cat(out, dim=2)).chunk(2, dim=1)
    return mu, log_var


def decode_unclamped(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    """`WanVAE.decode` without the final clamp to [-1, 1] (for training): raw latents
    [B, z, F, h, w] -> pixels [B, 3, 1 + 4(F - 1), 8h, 8w]."""
    b, _, num_frames, h, w = z.shape
    x = vae.conv2(z)
    caches = vae.decoder_cache_init(b, h, w, z.dtype, z.device)
    out = []
    for i in range(num_frames):
        io = CacheIO(caches, first=i == 0)
        out.append(vae.decoder(x[:, :, i : i + 1], io))
        caches = io.new
    return torch.cat(out, dim=2)


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


def _wan_constants() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(lat.LATENT_MEAN_VALUES), torch.tensor(lat.LATENT_STD_VALUES)


def normalize(mu: torch.Tensor) -> torch.Tensor:
    """Raw latents [B, 16, F, h, w] -> model space with the fixed Wan2.1 constants."""
    mean, std = _wan_constants()
    return (mu - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)


def _log(out: Path, record: dict) -> None:
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# The trainer


@dataclass
class LatentData:
    """The encoded training set: latents fp16 [N, 16, L, h, w], prompts, optional switch."""

    latents: torch.Tensor
    prompts: list[str]
    second_prompts: list[str]  # "" when the clip does not switch
    switch_latent: np.ndarray  # int [N]: first latent frame of the second prompt, -1 without a switch
    fg: torch.Tensor  # uint8 [N, L, h, w]: 1 where the shape is in that latent pixel (from the ground truth)


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


SENSITIVITY_SIGMAS = (0.5, 0.7, 0.85)


def swap_word(attrs: W.Attributes, name: str, rng: np.random.Generator) -> W.Attributes:
    """`attrs` with attribute `name` changed to another value of the world's vocabulary, drawn by `rng`."""
    values = {"shape": W.SHAPES, "colour": tuple(W.COLOURS), "motion": W.MOTIONS, "background": tuple(W.BACKGROUNDS),
              "camera": W.CAMERAS}[name]
    others = [v for v in values if v != getattr(attrs, name)]
    return dataclasses.replace(attrs, **{name: others[int(rng.integers(len(others)))]})


@torch.no_grad()
def prompt_sensitivity(dit: WanDiT, context_of, data: "LatentData", block: int, clips: int = 24,
                       seed: int = 0) -> dict[str, dict[str, float]]:
    """How much the DiT's x0 prediction on the shape depends on each word of the prompt.

    For the first causal block of `clips` clips without a prompt switch (a stream's start: no context),
    noised to each of SENSITIVITY_SIGMAS: the x0 MSE on shape latent pixels with one attribute swapped
    for another value, over the MSE with the true prompt. 1.0 means the DiT ignores that word; a model
    that draws what the prompt says has ratios well above 1 for colour and shape.
    `context_of(prompts)` -> text context [B, L, C]. Returns {attribute: {sigma: ratio}}.
    """
    rng = np.random.default_rng(seed)
    index = [i for i in range(len(data.prompts)) if data.switch_latent[i] < 0][:clips]
    x0 = data.latents[index, :, :block].float()  # [B, 16, block, h, w]
    fg = data.fg[index, :block].float()  # [B, block, h, w]
    attrs = [W.parse_prompt(data.prompts[i]) for i in index]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    contexts = {"true": context_of([a.prompt for a in attrs])}
    for name in W.ATTRIBUTE_NAMES:
        contexts[name] = context_of([swap_word(a, name, rng).prompt for a in attrs])
    result: dict[str, dict[str, float]] = {name: {} for name in W.ATTRIBUTE_NAMES}
    for sigma in SENSITIVITY_SIGMAS:
        x_t = (1.0 - sigma) * x0 + sigma * noise
        t = torch.full((len(index), block), 1000.0 * sigma)

        def shape_error(context: torch.Tensor) -> float:
            pred = x_t - sigma * dit(x_t, t, context, causal_block_size=block)  # x0 = x - sigma v
            return float(((pred - x0).square().mean(dim=1) * fg).sum() / fg.sum().clamp_min(1.0))

        true_error = shape_error(contexts["true"])
        for name in W.ATTRIBUTE_NAMES:
            result[name][f"{sigma:g}"] = shape_error(contexts[name]) / true_error
    return result


GROWN_ZERO = ("self_attn.o", "cross_attn.o", "ffn.2")  # a block with these zero adds nothing to the residual


def grown_dit_state(init: dict[str, torch.Tensor], fresh: WanDiT) -> dict[str, torch.Tensor]:
    """`init` (a trained DiT's state, L blocks) in `fresh`'s deeper layout (k L blocks), computing the same
    function: the trained blocks go to positions 0, k, 2k, ...; each block between them keeps `fresh`'s
    random weights with its output projections zeroed, so it is the identity until training moves them
    (their gradients are not zero: the projections' inputs are live). Growing capacity this way keeps
    what the shallower model learned instead of training the deeper one from scratch."""
    old_layers = 1 + max(int(k.split(".")[1]) for k in init if k.startswith("blocks."))
    new_layers = len(fresh.blocks)
    if new_layers % old_layers:
        raise ValueError(f"--dit-init has {old_layers} blocks: --dit-layers {new_layers} must be a multiple of it")
    ratio = new_layers // old_layers
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    for key, value in init.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            state[f"blocks.{int(index) * ratio}.{rest}"] = value.clone()
        else:
            state[key] = value.clone()
    for block in range(new_layers):
        if block % ratio:
            for name in GROWN_ZERO:
                state[f"blocks.{block}.{name}.weight"].zero_()
                state[f"blocks.{block}.{name}.bias"].zero_()
            # The shared time projection adds to every block's modulation: start from the trained
            # neighbour's, so the new block's norms see the scales the trained blocks see.
            state[f"blocks.{block}.modulation"] = init[f"blocks.{block // ratio}.modulation"].clone()
    return state


def weighted_flow_loss(v: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared velocity error [B, 16, F, h, w] over channels, then weighted by [B, F, h, w]."""
    err = (v - target).square().mean(dim=1)  # [B, F, h, w]
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def _vae_progress(state: dict | None) -> tuple[int, list[dict]]:
    """(phases finished, their summaries) of a VAE checkpoint. Checkpoints from before the phases
    existed say done=True when the short phase finished."""
    if state is None:
        return 0, []
    if "phases_done" in state:
        return state["phases_done"], state.get("summaries", [])
    return (1, [state["summary"]]) if state.get("done") else (0, [])


@dataclass(frozen=True)
class VAEPhase:
    name: str
    steps: int
    frames: int
    batch: int
    crop: int
    lr: float
    decoder_only: bool = False  # encoder (and the latent space) frozen; no re-standardising fold


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.ck = self.out / "checkpoints"
        self.data_dir = self.out / "data"
        self.tokenizer_dir = self.out / "tokenizer"
        self.model_dir = Path(cfg.model_out).expanduser() if cfg.model_out else self.out / "model"
        self.summary: dict = {}

    # -- run --------------------------------------------------------------------------------
    def run(self) -> Path:
        torch.set_num_threads(self.cfg.threads)
        self._prepare_out()
        t0 = time.time()
        vae = self.train_vae()
        data = self.build_data(vae)
        dit, text_model = self.train_dit(data)
        self.summary["wall_seconds"] = self.summary.get("wall_seconds_before", 0.0) + time.time() - t0
        model_dir = self.export(vae, dit, text_model)
        if self.cfg.eval_clips > 0:
            self.summary["eval"] = evaluate(model_dir, self.cfg)
            self._write_card(model_dir)
        return model_dir

    def _prepare_out(self) -> None:
        run_file = self.out / "run.json"
        if run_file.exists():
            if not self.cfg.resume:
                raise FileExistsError(f"{self.out} already holds a run: pass --resume to continue it, "
                                      "or choose another --out")
            old = json.loads(run_file.read_text())
            changed = [k for k in ARCHITECTURE_FIELDS if old["config"].get(k) != getattr(self.cfg, k)]
            if changed:
                raise ValueError(f"--resume with different {', '.join(changed)} than the run in {self.out}")
            self.summary["wall_seconds_before"] = float(old.get("wall_seconds", 0.0))
        self.ck.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"config": self.cfg.to_json(),
                                        "wall_seconds": self.summary.get("wall_seconds_before", 0.0)}, indent=2))
        if not (self.tokenizer_dir / "tokenizer.json").is_file():
            make_world_tokenizer(self.tokenizer_dir)

    # -- stage 1: VAE ---------------------------------------------------------------------------
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
        return _to_pixels(np.stack(clips)), torch.from_numpy(np.stack(weights)[:, None]).float()

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
        phases_done, summaries = _vae_progress(state)
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
        bar = _bar(phase.steps, step, f"vae ({phase.name} clips)", cfg.progress)
        tic = time.time()
        while step < phase.steps:
            for group in opt.param_groups:
                group["lr"] = phase.lr * _lr_factor(step, phase.steps, min(cfg.warmup, phase.steps // 10 + 1))
            x, weight = self._vae_batch(rng, step, phase)  # [B, 3, T, S, S], [B, 1, T, S, S]
            with torch.set_grad_enabled(not phase.decoder_only):
                mu, log_var = encode_moments(vae, x)  # [B, 16, F, S/8, S/8]
            log_var = log_var.clamp(-30.0, 20.0)
            z = mu + torch.exp(0.5 * log_var) * torch.randn(mu.shape, generator=gen)
            recon = decode_unclamped(vae, z)  # the clamp would stop gradients on overshooting pixels
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
                _log(self.out, {"stage": "vae", "phase": phase.name, "step": step,
                                "l1": float(np.mean(history[-cfg.log_every:])), "kl": kl.item(),
                                "sec_per_step": (time.time() - tic) / cfg.log_every})
                tic = time.time()
            if step % cfg.checkpoint_every == 0 and step < phase.steps:
                _save_atomic({"vae": vae.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                              "gen": gen.get_state(), "step": step, "history": history, "phase": index,
                              "phases_done": index, "summaries": earlier, "probe_start": probe_start}, path)
        bar.close()
        vae.eval()
        probe_end = self._vae_probe(vae, phase)
        vae.requires_grad_(True)
        summary = self._decoder_summary(vae, earlier) if phase.decoder_only else self._standardise_latents(vae, rng)
        summary.update(phase=phase.name, frames=phase.frames, steps=step, l1_start=_head_mean(history),
                       l1_end=_tail_mean(history), probe_l1_start=probe_start, probe_l1_end=probe_end,
                       stationarity=self._stationarity(vae))
        _save_atomic({"vae": vae.state_dict(), "done": True, "phases_done": index + 1,
                      "summaries": [*earlier, summary]}, path)
        return summary

    @torch.no_grad()
    def _decoder_summary(self, vae: WanVAE, earlier: list[dict]) -> dict:
        """The decoder phase leaves the latent space alone: the last fold's latent statistics still hold.
        The whole-frame L1 is measured again on 8 fixed 17-frame train clips, a draw of its own (so it
        does not compare with the fold's recon_l1_128, which saw other clips)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1, 99])
        x = _train_clip_pixels(rng, cfg.size)
        kept = {k: earlier[-1][k] for k in ("latent_std_raw", "normalised_mean", "normalised_std") if k in earlier[-1]}
        return {**kept, "recon_l1_128": float((vae.decode(vae.encode(x)) - x).abs().mean())}

    @torch.no_grad()
    def _stationarity(self, vae: WanVAE) -> dict:
        """A still scene must give one latent and one decoded frame for every chunk after the first few:
        mean |mu_i - mu_last| over the latent frames of a 49-frame still clip, relative to mean |mu|,
        and the decoded clip's L1 in its first and last 16 frames."""
        attrs = W.Attributes("circle", "red", "still", "dark blue", "none")
        x = _to_pixels(W.render_clip(attrs, 49, self.cfg.size, self.cfg.size, seed=0).frames[None])
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

    @torch.no_grad()
    def _standardise_latents(self, vae: WanVAE, rng: np.random.Generator) -> dict:
        """Fold an affine into the VAE so the Wan2.1 normalisation gives per-channel zero mean and
        unit overall variance on world clips (one scale for all channels keeps their relative sizes)."""
        cfg = self.cfg
        x = _train_clip_pixels(rng, cfg.size)
        mu = vae.encode(x)  # [8, 16, 5, h, w]
        mean_raw = mu.mean(dim=(0, 2, 3, 4))
        std_raw = (mu - mean_raw.view(1, -1, 1, 1, 1)).square().mean().sqrt()
        wan_mean, wan_std = _wan_constants()
        # normalised z = (scale mu + shift - mean) / std  ==  (mu - mean_raw) / std_raw
        scale = wan_std / std_raw
        shift = wan_mean - scale * mean_raw
        before = vae.decode(mu[:1])
        fold_latent_affine(vae, scale, shift)
        mu2 = vae.encode(x)
        after = vae.decode(mu2[:1])
        z = normalize(mu2)
        return {"latent_std_raw": float(std_raw), "fold_max_abs_diff": float((after - before).abs().max()),
                "normalised_mean": float(z.mean()), "normalised_std": float(z.std()),
                "recon_l1_128": float((vae.decode(mu2) - x).abs().mean())}

    # -- stage 2: data -------------------------------------------------------------------------
    def build_data(self, vae: WanVAE) -> LatentData:
        cfg = self.cfg
        shards = math.ceil(cfg.dataset_clips / cfg.shard_clips)
        latents_per_clip = lat.latent_length(cfg.clip_frames)
        missing = [s for s in range(shards) if not self._shard_path(s).is_file()]
        bar = _bar(shards, shards - len(missing), "data", cfg.progress)
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
            mu = vae.encode(_to_pixels(clip.frames[None]))  # [1, 16, L, h, w]
            encoded.append(normalize(mu)[0].half().numpy())
            masks.append(latent_fg_mask(clip, self.cfg.size))
            prompts.append(clip.prompt)
            seconds.append(second)
            switches.append(switch_latent)
        self._save_shard(shard, {"latents": np.stack(encoded), "prompts": np.array(prompts),
                                 "second_prompts": np.array(seconds),
                                 "switch_latent": np.array(switches, dtype=np.int64), "fg": np.stack(masks)})

    # -- stage 3: DiT ----------------------------------------------------------------------------
    def _new_text_model(self):
        from transformers import UMT5EncoderModel

        tokenizer = load_tokenizer(self.tokenizer_dir)
        config = umt5_config_for_official("tiny", vocab_size=len(tokenizer), d_model=self.cfg.text_dim,
                                          d_kv=self.cfg.text_dim // self.cfg.text_heads, d_ff=self.cfg.text_ffn,
                                          num_layers=self.cfg.text_layers, num_heads=self.cfg.text_heads)
        torch.manual_seed(self.cfg.seed + 3)
        return UMT5EncoderModel(config), tokenizer

    def _new_dit(self) -> WanDiT:
        torch.manual_seed(self.cfg.seed + 4)
        dit = WanDiT(self.cfg.dit_config())
        with torch.no_grad():  # adaLN-zero style: the untrained model predicts velocity 0
            dit.head.head.weight.zero_()
            dit.head.head.bias.zero_()
        return dit

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

    def train_dit(self, data: LatentData):
        cfg = self.cfg
        path = self.ck / "dit.pt"
        text_model, tokenizer = self._new_text_model()
        dit = self._new_dit()
        ema_dit, ema_text = self._new_dit(), self._new_text_model()[0]
        ema_dit.load_state_dict(dit.state_dict())
        ema_text.load_state_dict(text_model.state_dict())
        encoder = TextEncoder(text_model, tokenizer, text_len=cfg.text_len)
        text_model.requires_grad_(True)  # TextEncoder freezes its model; here it is trained
        opt = torch.optim.AdamW([{"params": list(dit.parameters()), "lr": cfg.dit_lr, "base": cfg.dit_lr},
                                 {"params": list(text_model.parameters()), "lr": cfg.text_lr, "base": cfg.text_lr}],
                                betas=(0.9, 0.99), weight_decay=0.01)
        rng = np.random.default_rng([cfg.seed, 3])
        gen = torch.Generator().manual_seed(cfg.seed + 12)
        step, history = 0, []
        if cfg.dit_init and not path.exists():
            init = load_checkpoint(Path(cfg.dit_init).expanduser())
            dit_state = grown_dit_state(init["ema_dit"], dit)  # the same state when the depths agree
            for module, weights in ((dit, dit_state), (ema_dit, dit_state), (text_model, init["ema_text"]),
                                    (ema_text, init["ema_text"])):
                module.load_state_dict(weights)
        if path.exists():
            state = load_checkpoint(path)
            dit.load_state_dict(state["dit"])
            text_model.load_state_dict(state["text"])
            ema_dit.load_state_dict(state["ema_dit"])
            ema_text.load_state_dict(state["ema_text"])
            opt.load_state_dict(state["opt"])
            rng.bit_generator.state = state["rng"]
            gen.set_state(state["gen"])
            step, history = state["step"], state["history"]
        token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def tokens(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            for p in prompts:
                if p not in token_cache:
                    ids, mask = encoder.tokenize([p])
                    token_cache[p] = (ids[0], mask[0])
            return (torch.stack([token_cache[p][0] for p in prompts]), torch.stack([token_cache[p][1] for p in prompts]))

        def context_of(text, prompts: list[str]) -> torch.Tensor:
            """TextEncoder.encode semantics (rows past the prompt are zero), with gradients: [B, L, C]."""
            ids, mask = tokens(prompts)
            return text(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None].float()

        probe = self._dit_batch(data, np.random.default_rng([cfg.seed, 8]), torch.Generator().manual_seed(cfg.seed + 13))

        @torch.no_grad()
        def probe_loss(dit_model, text) -> float:
            x_t, t, target, weight, prompts, block = probe
            return float(weighted_flow_loss(dit_model(x_t, t, context_of(text, prompts), causal_block_size=block),
                                            target, weight))

        resumed = path.exists() and state.get("probe_start") is not None
        probe_start = state["probe_start"] if resumed else probe_loss(dit, text_model)
        dit.train()
        text_model.train()
        bar = _bar(cfg.dit_steps, step, "dit", cfg.progress)
        tic = time.time()
        while step < cfg.dit_steps:
            factor = _lr_factor(step, cfg.dit_steps, cfg.warmup)
            for group in opt.param_groups:
                group["lr"] = group["base"] * factor
            x_t, t, target, weight, prompts, block = self._dit_batch(data, rng, gen)
            v = dit(x_t, t, context_of(text_model, prompts), causal_block_size=block)  # [B, 16, F, h, w]
            loss = weighted_flow_loss(v, target, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(dit.parameters()) + list(text_model.parameters()), 1.0)
            opt.step()
            # EMA from the end of warm-up, with the usual ramp (n + 1) / (n + 10) so short runs average too.
            n = step - cfg.warmup
            decay = 0.0 if n < 0 else min(cfg.ema, (n + 1) / (n + 10))
            _ema_update(ema_dit, dit, decay)
            _ema_update(ema_text, text_model, decay)
            step += 1
            history.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % cfg.log_every == 0 or step == cfg.dit_steps:
                _log(self.out, {"stage": "dit", "step": step, "loss": float(np.mean(history[-cfg.log_every:])),
                                "lr": cfg.dit_lr * factor, "sec_per_step": (time.time() - tic) / cfg.log_every})
                tic = time.time()
            if step % cfg.checkpoint_every == 0 or step == cfg.dit_steps:
                _save_atomic({"dit": dit.state_dict(), "text": text_model.state_dict(), "ema_dit": ema_dit.state_dict(),
                              "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                              "gen": gen.get_state(), "step": step, "history": history, "probe_start": probe_start},
                             path)
        bar.close()
        dit.eval()
        self.summary["dit"] = {"steps": step, "loss_start": _head_mean(history), "loss_end": _tail_mean(history),
                               "probe_loss_start": probe_start, "probe_loss_end": probe_loss(dit, text_model),
                               "probe_loss_end_ema": probe_loss(ema_dit, ema_text),
                               "prompt_sensitivity": prompt_sensitivity(ema_dit, lambda p: context_of(ema_text, p), data,
                                                                        block=cfg.num_frame_per_block, seed=cfg.seed),
                               "params": sum(p.numel() for p in dit.parameters()),
                               "text_params": sum(p.numel() for p in text_model.parameters())}
        return ema_dit.eval(), ema_text.eval()

    # -- stage 4: export ---------------------------------------------------------------------------
    def export(self, vae: WanVAE, dit: WanDiT, text_model) -> Path:
        """Write DIR/model in the official layout (atomically: a half-written folder never replaces one)."""
        from safetensors.torch import save_file

        tmp = self.model_dir.with_name(self.model_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(dit.config.to_official(), indent=2))
        save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "model": MODEL_NAME})
        torch.save(vae.state_dict(), tmp / OFFICIAL_VAE)
        torch.save(umt5_official_state_dict(text_model), tmp / OFFICIAL_T5)
        shutil.copytree(self.tokenizer_dir, tmp / OFFICIAL_TOKENIZER)
        self.summary["model_bytes"] = _folder_bytes(tmp)
        self._write_card(tmp)
        if self.model_dir.exists():
            shutil.rmtree(self.model_dir)
        os.replace(tmp, self.model_dir)
        run_file = self.out / "run.json"
        run = json.loads(run_file.read_text())
        run["wall_seconds"] = self.summary.get("wall_seconds", 0.0)
        run_file.write_text(json.dumps(run, indent=2))
        if self.summary["model_bytes"] > MAX_MODEL_BYTES:
            raise RuntimeError(f"the model folder is {self.summary['model_bytes'] / 2**20:.1f} MiB, over the "
                               f"{MAX_MODEL_BYTES / 2**20:.0f} MiB budget: use a smaller --dit-dim / --dit-layers")
        return self.model_dir

    def recommended_without_sweep(self) -> dict:
        return {**DEFAULT_SAMPLING, "guidance_scale": self.cfg.recommend_guidance}

    def _write_card(self, folder: Path) -> None:
        meta = {"name": MODEL_NAME, "config": self.cfg.to_json(), "summary": self.summary,
                "recommended": self.summary.get("eval", {}).get("best", self.recommended_without_sweep())}
        for key in ("out", "model_out", "resume", "progress"):  # where and how it ran, not what it is
            meta["config"].pop(key, None)
        if self.cfg.dit_init:  # the file it started from, not this machine's path to it
            meta["config"]["dit_init"] = Path(self.cfg.dit_init).name
        (folder / META_NAME).write_text(json.dumps(meta, indent=2))
        (folder / CARD_NAME).write_text(render_card(self.cfg, self.summary, meta["recommended"]))


def _head_mean(values: list[float], n: int = 50) -> float | None:
    return float(np.mean(values[:n])) if values else None


def _tail_mean(values: list[float], n: int = 50) -> float | None:
    return float(np.mean(values[-n:])) if values else None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------
# Evaluation sweep and the model card

# Sampling settings the card recommends until a sweep measures better ones.
DEFAULT_SAMPLING = {"mode": "kvcache", "num_inference_steps": 4, "shift": 2.0, "guidance_scale": 1.0, "ar_step": 2,
                    "causal_block_size": 2, "sink_blocks": 0, "window_blocks": 3}
SWEEP = [{"shift": s, "guidance_scale": g} for s in (1.0, 2.0, 4.0) for g in (1.0, 3.0)]


def stream_clip(pipe, prompt: str, settings: dict, chunks: int, size: int, seed: int) -> np.ndarray:
    """The first `chunks` chunks of a stream, concatenated: uint8 [T, H, W, 3]."""
    stream = pipe.stream(prompt, height=size, width=size, seed=seed, max_chunks=chunks, **settings)
    return np.concatenate(list(stream))


def evaluate(model_dir: Path, cfg: TrainConfig) -> dict:
    """Detector adherence on held-out prompts for each setting of SWEEP; the best one is recommended."""
    import warnings

    import skyrt

    from .detector import score_clip

    pipe = skyrt.load(model_dir)
    rng = np.random.default_rng([cfg.seed, 5])
    heldout = W.combinations("heldout")
    prompts = [heldout[int(i)] for i in rng.choice(len(heldout), size=cfg.eval_clips, replace=False)]
    results = []
    for setting in SWEEP:
        settings = {**DEFAULT_SAMPLING, **setting}
        scores, made, seconds = [], 0, 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k, attrs in enumerate(prompts):
                tic = time.perf_counter()
                frames = stream_clip(pipe, attrs.prompt, settings, chunks=6, size=cfg.size, seed=k)
                seconds += time.perf_counter() - tic
                made += len(frames)
                scores.append(score_clip(frames, attrs))
        per_attr = {n: float(np.mean([s.correct[n] for s in scores])) for n in W.ATTRIBUTE_NAMES}
        results.append({"settings": settings, "adherence": float(np.mean([s.adherence for s in scores])),
                        "per_attribute": per_attr, "generated_fps": made / seconds})
    # Best adherence; ties go to the cheaper setting (no CFG), then the earlier one.
    best = max(results, key=lambda r: (round(r["adherence"], 3), -r["settings"]["guidance_scale"]))
    return {"clips_per_setting": cfg.eval_clips, "frames_per_clip": int(len(frames)), "results": results,
            "best": best["settings"], "best_adherence": best["adherence"]}


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
        flag = "--" + f.name.replace("_", "-")
        flags.append(flag if value is True else f"--no-{f.name.replace('_', '-')}" if value is False else f"{flag} {value}")
    return "python -m skyrt_demo.train --out DIR " + " ".join(flags)


def render_card(cfg: TrainConfig, summary: dict, recommended: dict) -> str:
    """model_card.md: what the model is, its data, objective, hyper-parameters and measured losses."""
    vae, data, dit = summary.get("vae", {}), summary.get("data", {}), summary.get("dit", {})
    fmt = lambda v: "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [
        f"# {MODEL_NAME}: skyrt's demo model",
        "",
        "A tiny text-to-video model of the SkyReels-V2 / Wan2.1 architecture, trained from scratch on a CPU on",
        "skyrt's procedural world (`skyrt_demo.world`): one flat-coloured shape moving over a",
        "striped plain background, sometimes under a camera pan. It follows prompts such as",
        f"\"{W.EXAMPLE.prompt}\" and nothing else: it is a demo and a test fixture, not a general model.",
        "",
        "## Files (official SkyReels-V2 layout; `skyrt.load(this_folder)`)",
        "- `config.json`, `model.safetensors`: WanDiT "
        f"(dim {cfg.dit_dim}, {cfg.dit_layers} layers, {cfg.dit_heads} heads, ffn {cfg.dit_ffn}, patch (1, 2, 2), "
        f"text_len {cfg.text_len}, num_frame_per_block {cfg.num_frame_per_block} = block-causal attention), "
        f"{fmt(dit.get('params'))} parameters",
        f"- `{OFFICIAL_VAE}`: WanVAE, base width {cfg.vae_dim}, {cfg.vae_res_blocks} residual block(s) per stage, "
        "8x spatial / 4x temporal, 16 latent channels",
        f"- `{OFFICIAL_T5}`: umT5 encoder (d_model {cfg.text_dim}, {cfg.text_layers} layers), fp32 despite the "
        f"name; `{OFFICIAL_TOKENIZER}/`: a tokenizer holding every world word as one piece",
        f"- total {fmt(summary.get('model_bytes', 0) / 2**20)} MiB",
        "",
        "## Data",
        f"Train split of the world's attribute combinations ({len(W.combinations('train'))} of "
        f"{len(W.all_combinations())}); held out: every combination with a (colour, shape) pair in "
        f"{sorted(W.HELDOUT_COLOUR_SHAPE)} or a (motion, background) pair in {sorted(W.HELDOUT_MOTION_BACKGROUND)}.",
        f"{fmt(data.get('clips'))} clips of {cfg.clip_frames} frames at {cfg.size}x{cfg.size} "
        f"({fmt(data.get('switch_clips'))} with a prompt switch), encoded once by the trained VAE.",
        "",
        "## Objective",
        "- VAE: L1 reconstruction (shape pixels weighted " f"{1 + cfg.vae_fg_weight:g}x) + KL (weight {cfg.vae_kl}) "
        f"on {cfg.vae_frames}-frame clips, {cfg.vae_crop}px crops and whole frames, then {cfg.vae_long_steps} steps on "
        f"{cfg.vae_long_frames}-frame clips ({cfg.vae_long_crop}px crops) so the causal VAE is stationary on long "
        "streams (short clips alone leave every chunk after the third off); after each, an exact affine fold so "
        "the Wan2.1 latent normalisation standardises its latents."
        + (f" Then {cfg.vae_decoder_steps} steps of the decoder alone on {cfg.vae_long_frames}-frame clips (encoder "
           f"frozen, so the latent space stays put), the shape's outline weighted {cfg.vae_edge_weight:g}x more."
           if cfg.vae_decoder_steps else ""),
        "- DiT: diffusion forcing with rectified flow: x = (1 - sigma) x0 + sigma noise, target noise - x0, "
        "t = 1000 sigma per frame; an independent noise level per causal block; block-causal attention "
        f"(block sizes {cfg.block_sizes}); crops of {cfg.crop_frames} latent frames; leading blocks often clean "
        f"context at t = 0; {int(cfg.empty_prompt * 100)}% empty prompts (classifier-free guidance); EMA {cfg.ema}; "
        f"latent pixels on the shape (from the world's ground truth) weighted {1 + cfg.dit_fg_weight:g}x"
        + (f", on its outline {1 + cfg.dit_fg_weight + cfg.dit_edge_weight:g}x." if cfg.dit_edge_weight else ".")
        + (f" Extra shares of crops: {cfg.text_only_share:.0%} stream starts with no context, "
           f"{cfg.switch_crop_share:.0%} prompt switches." if cfg.text_only_share or cfg.switch_crop_share else ""),
        "",
        "## Training run",
        f"- seed {cfg.seed}; VAE {cfg.vae_steps} + {cfg.vae_long_steps} steps (batch {cfg.vae_batch} / "
        f"{cfg.vae_long_batch}, lr {cfg.vae_lr} / {cfg.vae_long_lr})"
        + (f" + {cfg.vae_decoder_steps} decoder-only steps (lr {cfg.vae_decoder_lr})" if cfg.vae_decoder_steps else "")
        + "; "
        f"DiT {fmt(dit.get('steps'))} steps ({cfg.dit_batch_frames} latent frames per batch, lr {cfg.dit_lr}, "
        f"text lr {cfg.text_lr}, warm-up {cfg.warmup}, cosine to 10%, train shift {cfg.train_shift})",
        f"- VAE L1 (pixels in [-1, 1], shape-weighted): {fmt(vae.get('l1_start'))} -> {fmt(vae.get('l1_end'))} "
        f"(mean of the first / last 50 steps); on a fixed probe batch {fmt(vae.get('probe_l1_start'))} -> "
        f"{fmt(vae.get('probe_l1_end'))}; whole-frame L1 after the fold {fmt(vae.get('recon_l1_128'))}; "
        f"normalised latent std {fmt(vae.get('normalised_std'))}; a still 49-frame clip decodes with L1 "
        f"{fmt(vae.get('stationarity', {}).get('decoded_l1_first16'))} in its first 16 frames and "
        f"{fmt(vae.get('stationarity', {}).get('decoded_l1_last16'))} in its last 16",
        f"- DiT flow-matching loss: {fmt(dit.get('loss_start'))} -> {fmt(dit.get('loss_end'))} (first / last 50 "
        f"steps); on a fixed probe batch {fmt(dit.get('probe_loss_start'))} -> {fmt(dit.get('probe_loss_end'))} "
        f"(EMA weights, the ones saved: {fmt(dit.get('probe_loss_end_ema'))})",
        *([] if not dit.get("prompt_sensitivity") else [
            "- prompt sensitivity at a stream's start (x0 error on the shape's latent pixels with one prompt word "
            "swapped, over the error with the true prompt; 1.00 = the DiT ignores that word), at sigma "
            + " / ".join(f"{s:g}" for s in SENSITIVITY_SIGMAS) + ": "
            + "; ".join(f"{name} " + " / ".join(f"{r:.2f}" for r in ratios.values())
                        for name, ratios in dit["prompt_sensitivity"].items())]),
        f"- wall time {fmt(summary.get('wall_seconds', 0) / 60)} min with {cfg.threads} CPU thread{'s' if cfg.threads != 1 else ''}",
        f"- reproduce: `{reproduce_command(cfg)}`" + (" (`--dit-init` names an earlier run's DiT checkpoint, see "
                                                       "below)" if cfg.dit_init else ""),
        "",
        "## Sampling",
        "Recommended (" + ("measured by the sweep below" if "eval" in summary
                           else "guidance from --recommend-guidance, chosen with benchmarks/quality.py"
                           if cfg.recommend_guidance != 1.0 else "not yet measured") + "): "
        + ", ".join(f"{k}={v}" for k, v in recommended.items()) + f", at {cfg.size}x{cfg.size}.",
    ]
    ev = summary.get("eval")
    if ev:
        lines += ["", f"Detector adherence on {ev['clips_per_setting']} held-out prompts per setting "
                  f"({ev['frames_per_clip']}-frame streams; generated frames/s on the training machine, "
                  f"{cfg.threads} thread(s), start-up included):", "",
                  "| shift | guidance | adherence | " + " | ".join(W.ATTRIBUTE_NAMES) + " | fps |",
                  "|---|---|---|" + "---|" * len(W.ATTRIBUTE_NAMES) + "---|"]
        for r in ev["results"]:
            s = r["settings"]
            lines.append(f"| {s['shift']} | {s['guidance_scale']} | {r['adherence']:.3f} | "
                         + " | ".join(f"{r['per_attribute'][n]:.2f}" for n in W.ATTRIBUTE_NAMES)
                         + f" | {r['generated_fps']:.1f} |")
    lines += ["", "Quality over long streams: `python benchmarks/quality.py --model THIS_FOLDER`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    model_dir = Trainer(cfg).run()
    print(f"wrote {model_dir} ({_folder_bytes(model_dir) / 2**20:.1f} MiB); card: {model_dir / CARD_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
