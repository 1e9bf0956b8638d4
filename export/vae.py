"""Wan2.1 causal video VAE: the torch reference, with its causal caches as explicit state.

What this file holds
- `WanVAE`, whose parameter names are exactly the keys of the official `Wan2.1_VAE.pth`, so the
  checkpoint loads with strict=True. `encode` (pixels -> raw latent mean) and `decode` (raw latents
  -> pixels in [-1, 1]) follow the official chunking: the encoder sees the first frame alone and
  then 4 frames at a time, the decoder sees one latent frame at a time.
- The causal-conv caches as a flat list of tensors with fixed shapes (`decode_step`,
  `encode_step`), so a streaming decoder can be exported to ONNX as "one latent frame + caches in,
  pixel frames + caches out". `StreamingDecoder` is the convenience wrapper on top.
- Latent normalisation (the official per-channel mean/std) and key maps between the official and diffusers
  (`AutoencoderKLWan`) layouts.

Shapes: B batch, T pixel frames (T = 1 + 4(F - 1)), F latent frames, H x W pixels (multiples of 8),
h x w = H/8 x W/8 latent grid.

Causal caches (why they are exact). Every temporal-kernel-3 causal conv sees, in front of its
input, the last 2 frames of what it saw before; the official code starts with none and pads zeros.
Here each cache is always 2 frames and starts as zeros, which feeds every conv the very same input
tensor, so a step-by-step decode equals a whole decode bit for bit. The only layers that behave
differently on the first step are the temporal resamplers:
- decoder `upsample3d`: on the first latent frame it does not double time (1 latent -> 1 pixel
  frame) and leaves its cache at zeros; later frames go through `time_conv` and double.
- encoder `downsample3d`: on the first chunk it only stores the last frame; later chunks prepend
  that frame and run a stride-2 temporal conv (5 -> 2 -> 1 frames).
Hence two step variants, `first=True` and `first=False`, with identical cache shapes.

Run the tests: `python -m pytest tests/test_vae.py -q`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skyrt.runtime import latents as _latents

__all__ = ["LATENT_MEAN", "LATENT_STD", "TINY", "WAN21", "CacheSpec", "DecoderStep", "StreamingDecoder", "VAEConfig",
           "WanVAE", "convert_diffusers_vae_state_dict", "denormalize_latents", "diffusers_to_official_vae_key",
           "infer_vae_config", "normalize_latents", "official_to_diffusers_vae_key"]

# --------------------------------------------------------------------------------------------
# Latent normalisation (official WanVAE constants, runtime/latents.py): z = (mu - mean) / std
# --------------------------------------------------------------------------------------------

# One owner for the constants: the torch-free runtime (skyrt.runtime.latents).
LATENT_MEAN = _latents.LATENT_MEAN_VALUES
LATENT_STD = _latents.LATENT_STD_VALUES


def normalize_latents(mu: Tensor) -> Tensor:
    """Raw VAE mean [B, 16, F, h, w] -> model-space latents (what the DiT sees)."""
    return _latents.normalize(mu, channel_axis=1)


def denormalize_latents(z: Tensor) -> Tensor:
    """Model-space latents [B, 16, F, h, w] -> raw latents for `WanVAE.decode`."""
    return _latents.denormalize(z, channel_axis=1)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE hyper-parameters (official `_video_vae` names; `dim` is diffusers' base_dim)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # official spelling, kept on purpose
    dropout: float = 0.0

    def __post_init__(self):
        # Lists from JSON become tuples so the config stays hashable and comparable.
        for name in ("dim_mult", "attn_scales", "temperal_downsample"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs one entry per downsampling stage ({len(self.dim_mult) - 1}), "
                f"got {list(self.temperal_downsample)}"
            )
        if self.attn_scales:
            # Neither the official encoder (its AttentionBlock takes no cache arguments) nor diffusers'
            # decoder (WanUpBlock has no attention) can run this, so there is nothing to check it against.
            raise ValueError(f"attn_scales={list(self.attn_scales)} is not supported: Wan2.1 uses none")

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height and width (8 for Wan2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame after the first (4 for Wan2.1)."""
        return 2 ** sum(self.temperal_downsample)

    @classmethod
    def from_diffusers(cls, config: Mapping) -> "VAEConfig":
        """From an `AutoencoderKLWan` config.json (Wan2.1 variants only)."""
        wan21_values = {"is_residual": False, "patch_size": None, "in_channels": 3, "out_channels": 3}
        for key, want in wan21_values.items():
            if config.get(key, want) != want:
                raise ValueError(f"diffusers VAE config {key}={config[key]!r} is not a Wan2.1 VAE (want {want!r})")
        decoder_dim = config.get("decoder_base_dim")
        if decoder_dim is not None and decoder_dim != config.get("base_dim", 96):
            raise ValueError(f"decoder_base_dim={decoder_dim} differs from base_dim: not a Wan2.1 VAE")
        for key, ours in (("latents_mean", LATENT_MEAN), ("latents_std", LATENT_STD)):
            theirs = config.get(key)
            if theirs is not None and any(abs(a - b) > 1e-6 for a, b in zip(theirs, ours, strict=True)):
                raise ValueError(f"diffusers VAE config {key} differs from the Wan2.1 constants")
        return cls(
            dim=config.get("base_dim", 96),
            z_dim=config.get("z_dim", 16),
            dim_mult=config.get("dim_mult", (1, 2, 4, 4)),
            num_res_blocks=config.get("num_res_blocks", 2),
            attn_scales=config.get("attn_scales", ()),
            temperal_downsample=config.get("temperal_downsample", (False, True, True)),
            dropout=config.get("dropout", 0.0),
        )

    def to_diffusers(self) -> dict:
        """Keyword arguments for diffusers' `AutoencoderKLWan` (tests build their oracle with it)."""
        d = asdict(self)
        d["base_dim"] = d.pop("dim")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


WAN21 = VAEConfig()
# RMS norms have no group-size constraint, so any small base works; 8 keeps tests fast.
# z_dim stays 16 because the DiT expects 16 latent channels.
TINY = VAEConfig(dim=8)


# --------------------------------------------------------------------------------------------
# Causal caches: explicit state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSpec:
    """One cache tensor: [B, channels, frames, H // stride, W // stride] for H x W pixels.

    `name` is the module that owns it (e.g. "decoder.upsamples.3.time_conv"), handy as an ONNX
    input/output name.
    """

    name: str
    channels: int
    frames: int
    stride: int

    def shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        return (batch, self.channels, self.frames, height // self.stride, width // self.stride)


class CacheIO:
    """The caches of one step: modules read `old[slot]` and write `new[slot]`; `first` marks step 0."""

    def __init__(self, caches: Sequence[Tensor], first: bool):
        self.old = list(caches)
        self.new = list(caches)  # a slot a step does not touch passes through unchanged
        self.first = first


# --------------------------------------------------------------------------------------------
# Layers (names and nesting mirror the official modules so state-dict keys match)
# --------------------------------------------------------------------------------------------


CPU_FAST_CONV = True  # benchmarks/vae_decode.py turns it off to measure the plain torch path


class CausalConv3d(nn.Conv3d):
    """3D conv that pads time only on the past side (so frame t never sees t+1).

    With a temporal padding p the conv needs 2p past frames: they come from its cache, a
    [B, C_in, 2p, H, W] tensor that starts as zeros (= the official zero padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.spatial_pad = (pw, pw, ph, ph)  # F.pad order: W left/right, H top/bottom
        self.cache_frames = 2 * pt
        self.cache_channels = in_channels
        self.cache_slot: int | None = None
        self.cache_stride: int | None = None

    def forward(self, x: Tensor, io: CacheIO | None = None) -> Tensor:
        if self.cache_frames:
            x = torch.cat([io.old[self.cache_slot], x], dim=2)  # [B, C, cache_frames + t, H, W]
            # clone: a view would keep the whole concatenation alive between steps.
            io.new[self.cache_slot] = x[:, :, -self.cache_frames:].clone()
        x = F.pad(x, self.spatial_pad)
        if _cpu_fast_path(x):
            # torch's CPU conv3d dispatch picks its im2col fallback for these small-channel shapes:
            # oneDNN computes the same convolution 8-20x faster (benchmarks/vae_decode.py).
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super().forward(x)


def _cpu_fast_path(x: Tensor) -> bool:
    """oneDNN conv for eager fp32 CPU inference; the plain op whenever a graph is being captured."""
    if not CPU_FAST_CONV or x.device.type != "cpu" or x.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


class RMSNorm(nn.Module):
    """Per-position L2 norm over channels, times sqrt(C) and a learned gain (official RMS_norm)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        # gamma [C, 1, 1, 1] for 5D video tensors, [C, 1, 1] for the attention's 4D frames.
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))
        self.scale = dim**0.5

    def forward(self, x: Tensor) -> Tensor:
        # == F.normalize(x, dim=1) (same 1e-12 floor on the norm); a channel sum is ~50x faster on
        # the CPU than F.normalize's strided vector norm for [B, C, T, H, W].
        inv_norm = torch.rsqrt(x.square().sum(dim=1, keepdim=True).clamp_min(1e-24))
        return x * inv_norm * self.scale * self.gamma


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x in height and width.

    The official module asks for "nearest-exact"; for an integer factor both modes pick source
    pixel floor(i / 2), and plain "nearest" is the one every ONNX/TensorRT Resize supports.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _per_frame(module: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2D module to each frame: [B, C, T, H, W] -> [B, C', T, H', W']."""
    b, c, t, h, w = x.shape
    y = module(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


class ResidualBlock(nn.Module):
    """norm-SiLU-conv3 twice plus a (1x1x1 conv) shortcut. Indices in `residual` match the checkpoint."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, io: CacheIO) -> Tensor:
        norm1, act1, conv1, norm2, act2, dropout, conv2 = self.residual
        h = self.shortcut(x)  # kernel 1 in time: no cache
        x = conv1(act1(norm1(x)), io)
        x = conv2(dropout(act2(norm2(x))), io)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no mixing across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, io: CacheIO | None = None) -> Tensor:
        return x + _per_frame(self._attend, x)

    def _attend(self, x: Tensor) -> Tensor:  # [N, C, H, W] frames
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w).permute(0, 1, 3, 2)  # [N, 1, HW, 3C]
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, 1, HW, C]
        return self.proj(out.squeeze(1).permute(0, 2, 1).reshape(n, c, h, w))


class Resample(nn.Module):
    """2x spatial up/down-sampling per frame, optionally with 2x temporal up/down-sampling.

    upsample3d:   time_conv (C -> 2C, causal k=3) turns each frame into 2; skipped on the first step.
    downsample3d: time_conv (k=3, stride 2, no padding) over [last frame of the previous chunk, x];
                  its 1-frame cache is owned by this module (the conv itself has no padding).
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        self.cache_frames = 0
        self.cache_channels = dim
        self.cache_slot: int | None = None
        self.cache_stride: int | None = None
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            # Pad right/bottom only, then a stride-2 conv: output pixel i covers inputs 2i..2i+2.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)
            self.cache_frames = 1

    def forward(self, x: Tensor, io: CacheIO) -> Tensor:
        if self.mode == "upsample3d" and not io.first:
            x = self._double_frames(self.time_conv(x, io))
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, io)
        return x

    @staticmethod
    def _double_frames(x: Tensor) -> Tensor:
        # [B, 2C, T, H, W] -> [B, C, 2T, H, W]: channel half j becomes frame 2t + j.
        b, c2, t, h, w = x.shape
        x = x.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5)
        return x.reshape(b, c2 // 2, 2 * t, h, w)

    def _halve_frames(self, x: Tensor, io: CacheIO) -> Tensor:
        # First chunk (1 frame) passes through; later chunks: [prev last frame, x] (1 + t frames)
        # -> stride-2 conv -> t / 2 frames.
        previous = io.old[self.cache_slot]  # [B, C, 1, H, W]
        io.new[self.cache_slot] = x[:, :, -1:].clone()
        if io.first:
            return x
        return self.time_conv(torch.cat([previous, x], dim=2))


def _set_cache_stride(module: nn.Module, stride: int) -> None:
    """Record, on every cache owner inside `module`, the pixel stride of the tensor it caches."""
    for m in module.modules():
        if getattr(m, "cache_frames", 0):
            m.cache_stride = stride


def _assign_slots(root: nn.Module, prefix: str) -> list[CacheSpec]:
    """Number the cache owners in forward (= registration) order; return the cache layout."""
    specs = []
    for name, m in root.named_modules():
        if getattr(m, "cache_frames", 0):
            m.cache_slot = len(specs)
            specs.append(CacheSpec(f"{prefix}.{name}", m.cache_channels, m.cache_frames, m.cache_stride))
    return specs


class Encoder3d(nn.Module):
    """Pixels [B, 3, t, H, W] -> moments [B, 2 z_dim, t', H/8, W/8] (t = 1 -> 1, t = 4 -> 1)."""

    def __init__(self, cfg: VAEConfig, out_dim: int):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        stride = 1  # pixels per feature-map position at the current depth
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        _set_cache_stride(self.conv1, stride)

        blocks = []
        for i, (in_dim, dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, dim, cfg.dropout))
                _set_cache_stride(blocks[-1], stride)
                in_dim = dim
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
                stride *= 2
                _set_cache_stride(blocks[-1], stride)  # its time cache holds downsampled frames
        self.downsamples = nn.Sequential(*blocks)

        self.middle = nn.Sequential(
            ResidualBlock(dims[-1], dims[-1], cfg.dropout), AttentionBlock(dims[-1]),
            ResidualBlock(dims[-1], dims[-1], cfg.dropout),
        )
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], out_dim, 3, padding=1))
        _set_cache_stride(self.middle, stride)
        _set_cache_stride(self.head, stride)

    def forward(self, x: Tensor, io: CacheIO) -> Tensor:
        return _run_stack(self.conv1, (*self.downsamples, *self.middle), self.head, x, io)


class Decoder3d(nn.Module):
    """Latents [B, z_dim, 1, h, w] -> pixels [B, 3, 1 (first step) or 4, 8h, 8w]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temperal_upsample = cfg.temperal_downsample[::-1]
        stride = cfg.spatial_factor
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], cfg.dropout), AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], cfg.dropout),
        )
        _set_cache_stride(self.conv1, stride)
        _set_cache_stride(self.middle, stride)

        blocks = []
        for i, (in_dim, dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # every stage but the first follows an upsampler, which halves channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, dim, cfg.dropout))
                _set_cache_stride(blocks[-1], stride)
                in_dim = dim
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
                _set_cache_stride(blocks[-1], stride)  # time_conv runs before the spatial upsample
                stride //= 2
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))
        _set_cache_stride(self.head, stride)

    def forward(self, x: Tensor, io: CacheIO) -> Tensor:
        return _run_stack(self.conv1, (*self.middle, *self.upsamples), self.head, x, io)


def _run_stack(conv1: nn.Module, blocks, head: nn.Sequential, x: Tensor, io: CacheIO) -> Tensor:
    """The encoder's and decoder's pass: conv1, the blocks in order, then norm, SiLU and conv (each
    causal conv reading and writing its own slot of the time cache `io`)."""
    x = conv1(x, io)
    for block in blocks:
        x = block(x, io)
    norm, act, conv = head
    return conv(act(norm(x)), io)


# --------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan2.1 VAE. `state_dict()` keys == `Wan2.1_VAE.pth` keys.

    Whole-clip API: `encode(video) -> mu`, `decode(mu) -> video` (raw latents, not normalised).
    Streaming API: `decode_step` / `encode_step` with caches from `decoder_cache_init` /
    `encoder_cache_init`; the layouts are `decoder_cache_specs` / `encoder_cache_specs`.
    """

    def __init__(self, config: VAEConfig = WAN21):
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config, out_dim=2 * config.z_dim)  # mu and log_var
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # diffusers: quant_conv
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)  # diffusers: post_quant_conv
        self.decoder = Decoder3d(config)
        self.encoder_cache_specs = _assign_slots(self.encoder, "encoder")
        self.decoder_cache_specs = _assign_slots(self.decoder, "decoder")

    # ---- caches --------------------------------------------------------------------------

    def _zeros(self, specs, batch, height, width, dtype, device) -> list[Tensor]:
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        return [torch.zeros(s.shape(batch, height, width), dtype=dtype, device=device) for s in specs]

    def decoder_cache_init(self, batch: int, latent_height: int, latent_width: int, dtype=None, device=None):
        """Zero decoder caches for a [batch, z_dim, 1, latent_height, latent_width] stream.

        Cache i has shape `decoder_cache_specs[i].shape(batch, 8 * latent_height, 8 * latent_width)`,
        i.e. [B, C_i, 2, 8h / s_i, 8w / s_i] with s_i in {8, 4, 2, 1}; all are 2 frames long.
        Mind the size at full resolution: 32 caches, about 4.6 GiB in fp32 for Wan2.1 at 544x960.
        """
        f = self.config.spatial_factor
        return self._zeros(self.decoder_cache_specs, batch, f * latent_height, f * latent_width, dtype, device)

    def encoder_cache_init(self, batch: int, height: int, width: int, dtype=None, device=None):
        """Zero encoder caches for [batch, 3, t, height, width] chunks (2 frames; 1 for downsample3d)."""
        return self._zeros(self.encoder_cache_specs, batch, height, width, dtype, device)

    # ---- decode --------------------------------------------------------------------------

    def decode_step(self, z_frame: Tensor, caches: Sequence[Tensor], first: bool) -> tuple[Tensor, list[Tensor]]:
        """One raw latent frame [B, z, 1, h, w] + caches -> pixels [B, 3, 1 if first else 4, 8h, 8w] + caches.

        `first=True` must be used for the first latent frame of a stream, with zero caches.
        """
        io = CacheIO(caches, first)
        frames = self.decoder(self.conv2(z_frame), io)
        return frames.clamp(-1.0, 1.0), io.new

    def decode(self, z: Tensor, clamp: bool = True) -> Tensor:
        """Raw latents [B, z, F, h, w] -> pixels [B, 3, 1 + 4(F - 1), 8h, 8w] in [-1, 1] (unclamped
        with clamp=False: what training differentiates through)."""
        b, _, num_frames, h, w = z.shape
        x = self.conv2(z)  # 1x1x1 conv over the whole clip, as the official code does
        caches = self.decoder_cache_init(b, h, w, z.dtype, z.device)
        out = []
        for i in range(num_frames):
            io = CacheIO(caches, first=i == 0)
            out.append(self.decoder(x[:, :, i : i + 1], io))
            caches = io.new
        pixels = torch.cat(out, dim=2)
        return pixels.clamp(-1.0, 1.0) if clamp else pixels

    # ---- encode --------------------------------------------------------------------------

    def encode_step(self, chunk: Tensor, caches: Sequence[Tensor], first: bool) -> tuple[Tensor, list[Tensor]]:
        """Pixels [B, 3, 1 if first else 4, H, W] + caches -> raw mu [B, z, 1, H/8, W/8] + caches."""
        io = CacheIO(caches, first)
        mu, _log_var = self.conv1(self.encoder(chunk, io)).chunk(2, dim=1)
        return mu, io.new

    def encode(self, video: Tensor) -> Tensor:
        """Pixels [B, 3, T, H, W] in [-1, 1], T = 1 + 4(F - 1) -> raw latent mean [B, z, F, H/8, W/8]."""
        return self.encode_moments(video)[0]

    def encode_moments(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """`encode` that also returns the posterior's log-variance (training): (mu, log_var), each
        [B, z, F, H/8, W/8]."""
        b, _, num_frames, height, width = video.shape
        step, f = self.config.temporal_factor, self.config.spatial_factor
        if num_frames % step != 1 or height % f or width % f:
            # The official code silently drops trailing frames; refuse instead.
            raise ValueError(
                f"video of {num_frames} frames at {height}x{width}: need 1 + {step}k frames and sides divisible by {f}"
            )
        caches = self.encoder_cache_init(b, height, width, video.dtype, video.device)
        chunks = [video[:, :, :1]] + [video[:, :, i : i + step] for i in range(1, num_frames, step)]
        out = []
        for i, chunk in enumerate(chunks):
            io = CacheIO(caches, first=i == 0)
            out.append(self.encoder(chunk, io))
            caches = io.new
        mu, log_var = self.conv1(torch.cat(out, dim=2)).chunk(2, dim=1)  # 1x1x1 over the clip, as official
        return mu, log_var


class StreamingDecoder:
    """Decode raw latent frames one at a time; the concatenated output equals `WanVAE.decode`."""

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Start a new stream: the next frame is decoded as the first one."""
        self.caches: list[Tensor] | None = None

    @torch.no_grad()  # caches outlive the step: with autograd on they would chain graphs forever
    def decode_next(self, z_frame: Tensor) -> Tensor:
        """Raw latent frame [B, z, 1, h, w] -> pixels [B, 3, 1 (first frame) or 4, 8h, 8w]."""
        first = self.caches is None
        if first:
            b, _, _, h, w = z_frame.shape
            self.caches = self.vae.decoder_cache_init(b, h, w, z_frame.dtype, z_frame.device)
        frames, self.caches = self.vae.decode_step(z_frame, self.caches, first)
        return frames


class DecoderStep(nn.Module):
    """`decode_step` with flat tensor arguments, for ONNX export: forward(z, *caches) -> (frames, *caches).

    Export one graph with first=True (1 frame out) and one with first=False (4 frames out); the
    cache shapes are the same for both (see `WanVAE.decoder_cache_specs`).
    """

    def __init__(self, vae: WanVAE, first: bool):
        super().__init__()
        self.vae = vae
        self.first = first

    def forward(self, z_frame: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        frames, new = self.vae.decode_step(z_frame, caches, self.first)
        return (frames, *new)


# --------------------------------------------------------------------------------------------
# Checkpoint layouts
# --------------------------------------------------------------------------------------------
#
# Official key = "<side>.<block>.<inner>.<leaf>" (or "conv1|conv2.<leaf>" at the top). Blocks and the
# inner names of a residual block are renamed; attention/resample inner names are shared. The only
# non-local rule: the official decoder numbers its blocks in one flat list ("upsamples.N"), diffusers
# groups them ("up_blocks.i.resnets.j" + "up_blocks.i.upsamplers.0"), so N = i * (R + 2) + j with
# R = num_res_blocks (R + 1 resnets and one upsampler per stage).

_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_BLOCKS = {
    "conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out",
    "middle.0": "mid_block.resnets.0", "middle.1": "mid_block.attentions.0", "middle.2": "mid_block.resnets.1",
}
_INNER = {
    "residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
    "shortcut": "conv_shortcut",
    "norm": "norm", "to_qkv": "to_qkv", "proj": "proj", "resample.1": "resample.1", "time_conv": "time_conv",
}


def _invert(d: dict) -> dict:
    return {v: k for k, v in d.items()}


_OFFICIAL_KEY = re.compile(
    r"(?P<side>encoder|decoder)\.(?P<block>conv1|head\.[02]|middle\.[012]|downsamples\.\d+|upsamples\.\d+)"
    r"\.(?:(?P<inner>[\w.]+)\.)?(?P<leaf>weight|bias|gamma)"
)
_DIFFUSERS_KEY = re.compile(
    r"(?P<side>encoder|decoder)\.(?P<block>conv_in|norm_out|conv_out|mid_block\.(?:resnets|attentions)\.\d+"
    r"|down_blocks\.\d+|up_blocks\.\d+\.(?:resnets\.\d+|upsamplers\.0))"
    r"\.(?:(?P<inner>[\w.]+)\.)?(?P<leaf>weight|bias|gamma)"
)


def _rename(key: str, pattern: re.Pattern, top: dict, blocks: dict, inner: dict, block_fn) -> str:
    head, _, leaf = key.rpartition(".")
    if head in top and leaf in ("weight", "bias"):
        return f"{top[head]}.{leaf}"
    m = pattern.fullmatch(key)
    if m is None or (m["inner"] is not None and m["inner"] not in inner):
        raise KeyError(f"VAE key {key!r} has no counterpart in the other layout")
    block = blocks.get(m["block"]) or block_fn(m["block"], key)
    parts = [m["side"], block] + ([inner[m["inner"]]] if m["inner"] else []) + [m["leaf"]]
    return ".".join(parts)


def official_to_diffusers_vae_key(key: str, num_res_blocks: int = 2) -> str:
    """`decoder.upsamples.4.residual.2.weight` -> `decoder.up_blocks.1.resnets.0.conv1.weight` (R=2)."""

    def block_fn(block: str, key: str) -> str:
        kind, n = block.split(".")
        if kind == "downsamples":
            return f"down_blocks.{n}"
        stage, j = divmod(int(n), num_res_blocks + 2)
        return f"up_blocks.{stage}.resnets.{j}" if j <= num_res_blocks else f"up_blocks.{stage}.upsamplers.0"

    return _rename(key, _OFFICIAL_KEY, _TOP, _BLOCKS, _INNER, block_fn)


def diffusers_to_official_vae_key(key: str, num_res_blocks: int = 2) -> str:
    """The inverse of `official_to_diffusers_vae_key`.

    `num_res_blocks` (2 for Wan2.1) matters only for decoder up-block keys; for a whole state dict
    prefer `convert_diffusers_vae_state_dict`, which reads it from the keys.
    """

    def block_fn(block: str, key: str) -> str:
        parts = block.split(".")
        if parts[0] == "down_blocks":
            return f"downsamples.{parts[1]}"
        if parts[0] != "up_blocks":
            raise KeyError(f"VAE key {key!r} has no counterpart in the official layout")
        if parts[2] == "upsamplers":
            j = num_res_blocks + 1
        elif (j := int(parts[3])) > num_res_blocks:
            raise KeyError(f"VAE key {key!r}: resnet index {j} > num_res_blocks={num_res_blocks}")
        return f"upsamples.{int(parts[1]) * (num_res_blocks + 2) + j}"

    return _rename(key, _DIFFUSERS_KEY, _invert(_TOP), _invert(_BLOCKS), _invert(_INNER), block_fn)


def _diffusers_num_res_blocks(keys) -> int:
    # Each decoder stage holds num_res_blocks + 1 resnets; read stage 0.
    found = [int(m[1]) for k in keys if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))]
    if not found:
        raise KeyError("no decoder.up_blocks.0.resnets.* keys: not an AutoencoderKLWan state dict")
    return max(found)


def convert_diffusers_vae_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKLWan` state dict -> official `Wan2.1_VAE.pth` keys (strict)."""
    num_res_blocks = _diffusers_num_res_blocks(state)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new_key = diffusers_to_official_vae_key(key, num_res_blocks)
        if new_key in out:
            raise KeyError(f"two diffusers VAE keys map to {new_key!r} (second: {key!r})")
        out[new_key] = value
    return out


def infer_vae_config(state: Mapping[str, Tensor]) -> VAEConfig:
    """Read a `VAEConfig` from an official state dict's keys and shapes (the .pth has no config)."""
    try:
        dim = state["encoder.conv1.weight"].shape[0]
        z_dim = state["conv2.weight"].shape[0]
    except KeyError as err:
        raise KeyError(f"not a Wan2.1 VAE state dict: missing {err}") from None
    # Walk the encoder's flat block list: residual blocks, closed by a resampler per stage.
    stage_dims, stage_blocks, temporal = [], [0], []
    n = 0
    while True:
        prefix = f"encoder.downsamples.{n}."
        if prefix + "residual.2.weight" in state:
            out_dim = state[prefix + "residual.2.weight"].shape[0]
            stage_blocks[-1] += 1
        elif prefix + "resample.1.weight" in state:
            stage_dims.append(out_dim)
            temporal.append(prefix + "time_conv.weight" in state)
            stage_blocks.append(0)
        elif prefix + "to_qkv.weight" in state:
            raise ValueError("VAE checkpoint has attention in the encoder stages: not supported (Wan2.1 has none)")
        else:
            break
        n += 1
    if n == 0:
        raise KeyError("not a Wan2.1 VAE state dict: no encoder.downsamples.* keys")
    stage_dims.append(out_dim)
    if len(set(stage_blocks)) != 1:
        raise ValueError(f"uneven residual blocks per encoder stage {stage_blocks}")
    return VAEConfig(
        dim=dim, z_dim=z_dim, dim_mult=tuple(d // dim for d in stage_dims), num_res_blocks=stage_blocks[0],
        temperal_downsample=tuple(temporal),
    )
