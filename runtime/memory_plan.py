"""Device memory of a stream, computed from the shapes: weights (shared by every stream of a process),
cache and activations (per stream). Torch-free: the fleet's admission (runtime/fleet/admission.py)
and the README's precision table (benchmarks/memory_table.py) read it.

    plan = plan_preset("self-forcing", height=480, width=832, precision="bf16")
    plan.weights_bytes, plan.per_stream_bytes, plan.to_json()

What each part counts (bytes = elements x the precision's width, PRECISIONS):
  weights      the DiT (parameter count from its config, `dit_parameters`), the Wan2.1 VAE decoder,
               and (optionally) the umT5-xxl text encoder; loaded once per process.
  cache        what the rollout core allocates once per stream (csrc/rollout.cpp): the ring's K/V
               [layers, contexts, slots x block x tokens, heads, head_dim] and the step's new K/V
               [layers, contexts, step frames x tokens, ...] in the K/V width; each prompt context's
               cross-attention K/V [layers, 2, text_len, dim]; the fp32 latent buffers (blocks in
               flight with their sampler history, the step's input and velocity, the ring's clean
               latents); the streaming VAE decoder's causal caches (2 frames per causal conv,
               WAN21_DECODER_CACHES), in the activation width.
  activations  an estimate of the peak working set, not a measurement: one DiT layer live at a time
               over the step's tokens (hidden, norm, q, k, v, attention out: 6 x dim; FFN hidden before
               and after the GELU: 2 x ffn_dim), attention without a score matrix (flash / memory-
               efficient kernels); the VAE decoder's largest stage (96 channels at full resolution over
               4 new + 2 cached frames, 3 maps live). A preset that recaches on a prompt switch (LongLive's
               policy, every fewstep family) runs one DiT pass over the whole ring once: that pass's
               working set is the peak (`recache_bytes`), and admission plans for it.

FP8 here is weight-only: DiT weights at 1 byte, everything else (K/V, activations, the VAE, umT5) at
16 bits, as TensorRT-RTX's weight-only FP8 runs. Allocator slack, CUDA context and workspace are not
counted: leave headroom (FleetGpu's `reserve`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .model_config import DF_1_3B_540P, DiTConfig, CLIP_DIM

# precision -> (bytes per DiT weight, bytes per K/V or activation element)
PRECISIONS: dict[str, tuple[int, int]] = {"fp32": (4, 4), "fp16": (2, 2), "bf16": (2, 2), "fp8": (1, 2)}
GIB = 1024 ** 3

# Wan2.1-T2V-1.3B, the architecture of every causal preset (DF-1.3B without the fps embedding).
WAN21_1_3B = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, inject_sample_info=False)
# Parameters of the Wan2.1 VAE decoder (its decoder and post-quant conv) and of the umT5-xxl encoder;
# tests/test_memory_plan.py counts both with the torch reference modules at their real configs.
WAN21_VAE_DECODER_PARAMETERS = 73_295_603
UMT5_XXL_PARAMETERS = 5_680_910_336
# The Wan2.1 VAE decoder's causal caches: (channels, spatial stride, how many), each 2 frames of
# [channels, H / stride, W / stride] (export/vae.py decoder_cache_specs, checked by the tests).
WAN21_DECODER_CACHES = ((16, 8, 1), (384, 8, 11), (192, 4, 1), (384, 4, 6), (192, 2, 6), (96, 1, 7))
DECODER_CACHE_FRAMES = 2
DECODER_TOP_CHANNELS, DECODER_LIVE_MAPS, DECODER_STAGE_FRAMES = 96, 3, 4 + DECODER_CACHE_FRAMES
LATENT_CHANNELS, SPATIAL, PATCH, TEMPORAL = 16, 8, 2, 4


@dataclass(frozen=True)
class StreamShape:
    """The shapes of one stream that set its memory. Frames are latent frames."""

    height: int  # pixels
    width: int
    block_frames: int  # latent frames per causal block
    sink_blocks: int
    window_blocks: int
    blocks_in_flight: int  # blocks denoised together per DiT call
    contexts: int = 1  # 2 with classifier-free guidance (cond + uncond as one batch)
    history_buffers: int = 0  # per block in flight: UniPC 3, flow Euler / fewstep 0
    step_noise: bool = False  # per block in flight: a noise buffer (the fewstep sampler re-noises)
    recache: bool = False  # a prompt switch re-runs the ring through the DiT (step frames = ring + 1 block)

    def __post_init__(self):
        if self.height % (SPATIAL * PATCH) or self.width % (SPATIAL * PATCH):
            raise ValueError(f"{self.height}x{self.width}: height and width must be multiples of "
                             f"{SPATIAL * PATCH} (VAE 8x, patch 2x)")

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // SPATIAL, self.width // SPATIAL

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.latent_size
        return (h // PATCH) * (w // PATCH)

    @property
    def ring_frames(self) -> int:
        return (self.sink_blocks + self.window_blocks) * self.block_frames

    @property
    def step_frames(self) -> int:
        """Frames of the largest DiT call the core sizes its buffers for (kvcache.py's step_blocks)."""
        blocks = max(self.blocks_in_flight, self.sink_blocks + self.window_blocks + 1 if self.recache else 0)
        return blocks * self.block_frames


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes by part; `weights` are shared per process, `cache` and `activations` are per stream."""

    precision: str
    weights: dict[str, int]
    cache: dict[str, int]
    activations: dict[str, int]
    notes: tuple[str, ...] = field(default=())

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def cache_bytes(self) -> int:
        return sum(self.cache.values())

    @property
    def activation_bytes(self) -> int:
        """The peak working set: the larger of a step's and (if any) a recache pass's."""
        return max(self.activations.values())

    @property
    def per_stream_bytes(self) -> int:
        return self.cache_bytes + self.activation_bytes

    def total_bytes(self, streams: int = 1) -> int:
        """One process holding the weights once and `streams` streams."""
        return self.weights_bytes + streams * self.per_stream_bytes

    def to_json(self) -> dict:
        return {"precision": self.precision, "weights": self.weights, "cache": self.cache,
                "activations": self.activations, "weights_bytes": self.weights_bytes,
                "cache_bytes": self.cache_bytes, "activation_bytes": self.activation_bytes,
                "per_stream_bytes": self.per_stream_bytes, "notes": list(self.notes)}


# ----------------------------------------------------------------------------------------- weights
def dit_parameters(cfg: DiTConfig) -> int:
    """Parameters of the Wan2.1 DiT of `cfg` (export/dit.py's WanDiT; the tests count the module)."""
    d, f, patch = cfg.dim, cfg.ffn_dim, math.prod(cfg.patch_size)
    linear = lambda i, o: i * o + o  # noqa: E731  (weight + bias)
    qk_norms = 2 * d if cfg.qk_norm else 0
    attention = 4 * linear(d, d) + qk_norms
    cross = attention + (2 * linear(d, d) + (d if cfg.qk_norm else 0) if cfg.model_type == "i2v" else 0)
    block = (attention + cross + linear(d, f) + linear(f, d) + (2 * d if cfg.cross_attn_norm else 0)
             + 6 * d)  # self, cross, FFN, norm3's affine, modulation
    top = (cfg.in_dim * d * patch + d + linear(cfg.text_dim, d) + linear(d, d) + linear(cfg.freq_dim, d)
           + linear(d, d) + linear(d, 6 * d) + linear(d, cfg.out_dim * patch) + 2 * d)
    if cfg.inject_sample_info:
        top += 2 * d + linear(d, d) + linear(d, 6 * d)  # fps embedding and projection
    if cfg.model_type == "i2v":
        top += 2 * CLIP_DIM + linear(CLIP_DIM, CLIP_DIM) + linear(CLIP_DIM, d) + 2 * d  # image embedding MLP
    return cfg.num_layers * block + top


def _weights(cfg: DiTConfig, precision: str, text_encoder: bool) -> dict[str, int]:
    weight_bytes, act_bytes = PRECISIONS[precision]
    weights = {"dit": dit_parameters(cfg) * weight_bytes, "vae_decoder": WAN21_VAE_DECODER_PARAMETERS * act_bytes}
    if text_encoder:  # released in bf16; 16-bit except in an fp32 plan
        weights["text_encoder"] = UMT5_XXL_PARAMETERS * act_bytes
    return weights


# ------------------------------------------------------------------------------------ per stream
def _cache(cfg: DiTConfig, s: StreamShape, act_bytes: int) -> dict[str, int]:
    tpf, (h, w) = s.tokens_per_frame, s.latent_size
    kv_row = cfg.num_layers * s.contexts * cfg.dim * act_bytes  # one token's K (or V) over every layer
    block_latent = LATENT_CHANNELS * s.block_frames * h * w
    per_block = block_latent * (1 + s.history_buffers + (1 if s.step_noise else 0))
    latents = 4 * (s.blocks_in_flight * per_block + 2 * s.contexts * LATENT_CHANNELS * s.step_frames * h * w
                   + (s.sink_blocks + s.window_blocks + 1) * block_latent)  # fp32: in flight, step in/out, ring + scratch
    height, width = s.height, s.width
    decoder = sum(c * n * DECODER_CACHE_FRAMES * (height // st) * (width // st) for c, st, n in WAN21_DECODER_CACHES)
    return {"ring_kv": 2 * s.ring_frames * tpf * kv_row, "step_kv": 2 * s.step_frames * tpf * kv_row,
            "prompt_kv": 2 * cfg.text_len * kv_row, "latents": latents, "vae_decoder_cache": decoder * act_bytes}


def _dit_pass(cfg: DiTConfig, tokens: int, contexts: int, act_bytes: int) -> int:
    return contexts * tokens * (6 * cfg.dim + 2 * cfg.ffn_dim) * act_bytes


def _activations(cfg: DiTConfig, s: StreamShape, act_bytes: int) -> dict[str, int]:
    decode = DECODER_LIVE_MAPS * DECODER_TOP_CHANNELS * DECODER_STAGE_FRAMES * s.height * s.width * act_bytes
    step = _dit_pass(cfg, s.blocks_in_flight * s.block_frames * s.tokens_per_frame, s.contexts, act_bytes)
    out = {"step": max(step, decode)}  # the DiT and the decoder run one after the other
    if s.recache:
        out["recache"] = _dit_pass(cfg, s.step_frames * s.tokens_per_frame, s.contexts, act_bytes)
    return out


def plan_stream(cfg: DiTConfig, shape: StreamShape, precision: str = "bf16", text_encoder: bool = True,
                other_weights: dict[str, int] | None = None) -> MemoryPlan:
    """The memory of one stream of `cfg` with `shape` at `precision` (see the module docstring).
    other_weights: bytes of the VAE decoder and text encoder when they are not Wan2.1's and umT5-xxl's
    (a model folder's files as stored: `folder_weights`); the decoder's caches and activations stay
    the Wan2.1 VAE's, an upper bound for a smaller VAE."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    act_bytes = PRECISIONS[precision][1]
    notes = ["weight-only FP8: K/V, activations, VAE and umT5 at 16 bits"] if precision == "fp8" else []
    weights = _weights(cfg, precision, text_encoder)
    if other_weights is not None:
        weights = {"dit": weights["dit"], **{k: v for k, v in other_weights.items() if text_encoder or k != "text_encoder"}}
        notes.append("VAE and text encoder: their files' sizes; VAE caches: the Wan2.1 VAE's (an upper bound)")
    return MemoryPlan(precision, weights, _cache(cfg, shape, act_bytes), _activations(cfg, shape, act_bytes),
                      tuple(notes))


def folder_weights(folder) -> dict[str, int]:
    """Bytes of a model folder's VAE and umT5 files as stored (official layout names)."""
    from pathlib import Path

    folder = Path(folder)
    sizes = {"vae_decoder": folder / "Wan2.1_VAE.pth", "text_encoder": folder / "models_t5_umt5-xxl-enc-bf16.pth"}
    return {name: path.stat().st_size for name, path in sizes.items() if path.is_file()}


# --------------------------------------------------------------------------------------- presets
# The SkyReels-V2 DF-1.3B KV-cached stream at the official async settings: 30 steps, ar_step 5, blocks
# of 5 latent frames, UniPC, guidance 6 (cond + uncond), ring sink 1 + window 4 blocks.
DF_1_3B_STREAM = dict(block_frames=5, sink_blocks=1, window_blocks=4, blocks_in_flight=math.ceil(30 / 5), contexts=2,
                      history_buffers=3)
DF_1_3B = "df-1.3b"
RESOLUTIONS = {"480x832": (480, 832), "544x960": (544, 960), "720x1280": (720, 1280)}


def preset_shape(name: str, height: int, width: int) -> tuple[DiTConfig, StreamShape]:
    """(DiT config, stream shape) of a causal preset (runtime/causal_family.py) or "df-1.3b"."""
    if name == DF_1_3B:
        return DF_1_3B_540P, StreamShape(height, width, **DF_1_3B_STREAM)
    from .causal_family import get_preset

    preset = get_preset(name)
    sampling, ring = preset.sampling, preset.ring
    steps = len(sampling.denoising_step_list)
    rolling = preset.rolling_cache is not None
    # One block at a time (ar_step = steps), or Rolling-Forcing's staggered window (ar_step 1: one block
    # per step in flight); every family but Rolling-Forcing recaches on a switch (causal_rollout.py).
    return WAN21_1_3B, StreamShape(height, width, block_frames=sampling.causal_block_size,
                                   sink_blocks=ring.sink_blocks, window_blocks=ring.window_blocks,
                                   blocks_in_flight=steps if rolling else 1, contexts=1, history_buffers=0,
                                   step_noise=steps > 1, recache=not rolling)


def plan_preset(name: str, height: int = 480, width: int = 832, precision: str = "bf16",
                text_encoder: bool = True) -> MemoryPlan:
    cfg, shape = preset_shape(name, height, width)
    return plan_stream(cfg, shape, precision, text_encoder)


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"
