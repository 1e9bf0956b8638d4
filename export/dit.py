"""Torch reference of the SkyReels-V2 / Wan2.1 diffusion transformer (DiT), diffusion-forcing ready.

What it is: one flat, readable model whose parameter names are exactly the official checkpoint keys
(`blocks.0.self_attn.q.weight`, ...), so an official state dict loads with strict=True, plus the key
maps to and from the diffusers `SkyReelsV2Transformer3DModel` names. It is the numerical reference
for the exported engines, and the torch backend runs it directly.

Deliberate differences from the public implementations (outputs agree, see tests/test_dit.py):
- RoPE is real-valued (cos/sin of interleaved pairs), no complex tensors, so it exports to ONNX and
  TensorRT. Angles are computed in float64 then stored as fp32 tables (runtime/rope.py, torch-free).
- Timesteps are always per latent frame ([B, F]); a [B] timestep is broadcast. Modulation is applied
  per frame on a [B, F, S, D] token grid instead of being repeated for every token.
- The fps embedding is added per sample. Both public versions tile it with `.repeat(F, 1, 1)`, which
  mixes samples when B > 1 with different fps (diffusers even fails to broadcast for B > 1).
- Block-causal attention is an explicit forward argument, never state stored in the model/config.
- Norms, modulation, RoPE and the time/fps embeddings run in fp32 whatever the weight dtype (weights
  are upcast on the fly); the residual stream stays fp32; the big matmuls and attention run in the
  weight dtype of `patch_embedding`.

Shapes: B batch, C channels, F latent frames, H/W latent height/width, f/h/w the token grid after
patching (f = F for patch (1, 2, 2)), S = h*w tokens per frame, L = f*S tokens, D = dim,
N heads, Dh = D // N head dim, Lt text tokens, Li = 257 image (CLIP) tokens.

Run its tests: python -m pytest tests/test_dit.py -q
"""
from __future__ import annotations

import copy
import math
import weakref
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The config is torch-free (the serving runtime reads it too); re-exported here for the model code.
from skyrt.runtime.model_config import CLIP_DIM, DF_1_3B_540P, DF_14B_540P, DF_14B_720P, TINY, DiTConfig  # noqa: F401
# The time sinusoid and RoPE tables are torch-free (the serving backends feed them to the graphs).
from skyrt.runtime import rope as _rope
from skyrt.runtime.rope import ROPE_THETA, rope_axis_pairs  # noqa: F401
from . import shape_trace  # which eager fast paths apply while exporting by shapes




# ----------------------------------------------------------------------------------------------
# Small numerical pieces (pure functions: the exporter and the KV-cached step reuse them)


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in fp32 whatever dtype its weights are stored in (fp32 islands)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


CPU_FAST_LINEAR = True  # benchmarks turn it off to measure torch's default CPU GEMM
# Packed weights live beside the modules, not on them: an opaque oneDNN tensor cannot be deep-copied
# or saved, and a module must stay copyable.
_ONEDNN_WEIGHTS: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear in its weight dtype (the big matmuls: bf16/fp16 after a cast, fp32 in the reference)."""
    x = x.to(layer.weight.dtype)
    if _onednn_linear_applies(x):
        return _onednn_linear(layer, x)
    return layer(x)


def _onednn_linear_applies(x: torch.Tensor) -> bool:
    """Eager fp32 CPU inference only: never while training (packed weights would go stale) or while a
    graph is being captured for export (the plain op is what ONNX must see)."""
    if not CPU_FAST_LINEAR or torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
                or shape_trace.active())


def _onednn_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ W^T + b through oneDNN with the weight packed once per weight version.

    torch's default CPU linear calls MKL, which on AMD CPUs (this project's CI machines) runs about
    half as fast as oneDNN: 172 vs 439 GFLOP/s for 256x256 @ 256x1024 (benchmarks/rollout.py notes).
    Results agree to fp32 accumulation order (~1e-6 relative).
    """
    weight = layer.weight
    key = (weight.data_ptr(), weight._version)
    packed = _ONEDNN_WEIGHTS.get(layer)
    if packed is None or packed[0] != key:
        packed = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        _ONEDNN_WEIGHTS[layer] = packed
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed[1], layer.bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[...] timesteps -> [..., dim] fp32 embedding, cos half first: runtime/rope.py's table (float64
    angles, computed on the host) as a tensor on t's device. Never traced: the exported graphs take
    the sinusoid as an input (TensorRT has no float64)."""
    return torch.from_numpy(_rope.timestep_sinusoid(t.detach().cpu().numpy(), dim)).to(t.device)


def rope_cos_sin(
    head_dim: int,
    frame_positions,
    h: int,
    w: int,
    max_positions: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real RoPE tables (cos, sin), each fp32 [f*h*w, head_dim // 2], of frames at `frame_positions`
    ([f] ints or LongTensor) on an h x w token grid: runtime/rope.py rope_tables as tensors."""
    positions = frame_positions.cpu().numpy() if isinstance(frame_positions, torch.Tensor) else frame_positions
    cos, sin = _rope.rope_tables(head_dim, positions, h, w, max_positions)
    return torch.from_numpy(cos), torch.from_numpy(sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2i, 2i+1) of x [B, L, N, Dh] by the angles of cos/sin [L, Dh/2].

    The real form of the official `view_as_complex(x) * freqs`; computed and returned in fp32.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, N, Dh/2, 2]
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2)


def block_causal_mask(num_frames: int, tokens_per_frame: int, block_size: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [L, L] mask (True = may attend): a token sees every token of its own block of
    `block_size` frames and of all earlier blocks. block_size=1 is plain frame-causal attention."""
    if block_size < 1 or num_frames % block_size:
        raise ValueError(f"{num_frames} latent frames cannot be split into causal blocks of {block_size}: "
                         "both public implementations leave such frames undenoised; use a divisor")
    block_of_token = (torch.arange(num_frames, device=device) // block_size).repeat_interleave(tokens_per_frame)
    return block_of_token[None, :] <= block_of_token[:, None]  # [query, key]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention, q [B, Lq, N, Dh], k/v [B, Lk, N, Dh], mask [Lq or 1, Lk] (bool, or an additive
    float bias) -> [B, Lq, N*Dh].

    Runs in v's dtype (the compute dtype); q/k arrive fp32 from the norms and RoPE.
    """
    q, k = q.to(v.dtype), k.to(v.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def collapse_padding_rows(context: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """context [1, Lt, C] -> (context [1, Lu, C], logit bias [Lu] fp32, or None if nothing repeats).

    umT5 contexts are padded to 512 tokens with identical (zero) rows, and the public code attends to
    all of them. Identical context rows give identical keys and values (the text embedding and the
    key norm act per token), and softmax over n identical keys equals softmax over one of them with
    log(n) added to its logit. So the trailing run of identical rows becomes one row with that bias.
    """
    if context.shape[0] != 1 or context.shape[1] < 2:
        return context, None
    rows = context[0]
    same_as_last = (rows == rows[-1]).all(dim=-1)  # [Lt]
    run = int(same_as_last.flip(0).int().cumprod(0).sum())  # identical rows at the end
    if run < 2:
        return context, None
    keep = rows.shape[0] - run + 1
    bias = torch.zeros(keep, dtype=torch.float32)
    bias[-1] = math.log(run)
    return context[:, :keep], bias


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, f, S, D] normalised, shift/scale [B, f, 1, D] per frame (fp32)."""
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------
# Layers (official module names: they define the checkpoint keys)


class RMSNorm(nn.Module):
    """RMS norm over the whole feature axis (all heads together), fp32 in, fp32 out."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight.float()


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 (returns fp32) whatever the stored weight dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def _qk_norm(dim: int, cfg: DiTConfig) -> nn.Module:
    return RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()


class _Attention(nn.Module):
    """The projections both attentions have (official names q, k, v, o, norm_q, norm_k)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = _qk_norm(cfg.dim, cfg)
        self.norm_k = _qk_norm(cfg.dim, cfg)


class SelfAttention(_Attention):
    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, L, D] -> q, k (fp32, normed and rotated), v (compute dtype), each [B, L, N, Dh].

        The KV-cached step calls this for the new frames and appends k/v to its cache.
        """
        q = apply_rope(self.norm_q(_linear(self.q, x)).unflatten(-1, (self.num_heads, -1)), cos, sin)
        k = apply_rope(self.norm_k(_linear(self.k, x)).unflatten(-1, (self.num_heads, -1)), cos, sin)
        v = _linear(self.v, x).unflatten(-1, (self.num_heads, -1))
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[torch.Tensor] = None, keys_values: Optional[Callable] = None) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]. keys_values(k, v) -> (keys, values) lets the KV-cached step put
        cached keys/values [B, S, N, Dh] in front of this call's own (and keep the new ones)."""
        q, k, v = self.project_qkv(x, cos, sin)
        if keys_values is not None:
            k, v = keys_values(k.to(v.dtype), v)
        return _linear(self.o, attention(q, k, v, mask))


class CrossKV(NamedTuple):
    """Per-layer cross-attention keys/values, [B, Lt, N, Dh] (text) and [B, Li, N, Dh] (image or None).

    They depend only on the prompt (and image), so a rollout computes them once per prompt.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_img: Optional[torch.Tensor] = None
    v_img: Optional[torch.Tensor] = None
    # [Lt] fp32 additive logit bias of the text keys (see collapse_padding); [B, Lt] for a batch of
    # prompts padded to one length (batch_cross_kv)
    bias: Optional[torch.Tensor] = None


def batch_cross_kv(prompts: list, length: int | None = None) -> list:
    """Per-prompt cross-attention K/V lists (one CrossKV [1, Lt_i, N, Dh] per layer, from
    WanDiT.cross_attention_kv with collapse_padding) -> one list of batched CrossKV [B, Lt, N, Dh]:
    shorter prompts (collapse_padding leaves each its own length) padded with zero keys under a -inf
    logit bias [B, Lt], which softmax gives exactly 0. length: pad to that many keys (fixed shapes,
    every prompt the same; the bias is then always given), default the longest prompt's."""
    longest = max(p[0].k.shape[1] for p in prompts)
    if length is not None and length < longest:
        raise ValueError(f"a prompt has {longest} cross-attention keys, more than the fixed length {length}")
    fixed = length is not None
    length = longest if length is None else int(length)
    bias = None
    if fixed or any(p[0].bias is not None or p[0].k.shape[1] != length for p in prompts):
        bias = torch.full((len(prompts), length), float("-inf"))
        for b, p in enumerate(prompts):
            n = p[0].k.shape[1]
            bias[b, :n] = 0.0 if p[0].bias is None else p[0].bias

    def pad(x: torch.Tensor) -> torch.Tensor:  # [1, n, N, Dh] -> [1, length, N, Dh]
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, length - x.shape[1]))

    layers = []
    for per_prompt in zip(*prompts):
        k = torch.cat([pad(kv.k) for kv in per_prompt])
        v = torch.cat([pad(kv.v) for kv in per_prompt])
        images = [kv.k_img for kv in per_prompt]
        k_img = None if images[0] is None else torch.cat(images)
        v_img = None if images[0] is None else torch.cat([kv.v_img for kv in per_prompt])
        layers.append(CrossKV(k, v, k_img, v_img, None if bias is None else bias.to(k.device)))
    return layers


def cross_bias(bias: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """CrossKV.bias -> an additive attention bias on [B, N, Lq, Lt] scores: [Lt] (one prompt) -> [1, Lt];
    [B, Lt] (a batch of prompts padded to one length, -inf on the padding) -> [B, 1, 1, Lt]."""
    if bias is None:
        return None
    bias = bias.to(dtype)
    return bias[None] if bias.dim() == 1 else bias[:, None, None]


class CrossAttention(_Attention):
    """Attention from video tokens to text tokens; the i2v variant adds a second, separate attention
    to the CLIP image tokens (own k_img/v_img) whose output is summed before `o`."""

    def __init__(self, cfg: DiTConfig):
        super().__init__(cfg)
        self.has_image = cfg.model_type == "i2v"
        if self.has_image:
            self.k_img = nn.Linear(cfg.dim, cfg.dim)
            self.v_img = nn.Linear(cfg.dim, cfg.dim)
            self.norm_k_img = _qk_norm(cfg.dim, cfg)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def context_kv(self, text: torch.Tensor, image: Optional[torch.Tensor] = None) -> CrossKV:
        """Embedded text [B, Lt, D] (and image [B, Li, D]) -> this layer's CrossKV."""
        k = self._heads(self.norm_k(_linear(self.k, text))).to(self.v.weight.dtype)
        v = self._heads(_linear(self.v, text))
        if not self.has_image:
            return CrossKV(k, v)
        if image is None:
            raise ValueError("an i2v model needs the CLIP image tokens (clip_fea)")
        k_img = self._heads(self.norm_k_img(_linear(self.k_img, image))).to(self.v_img.weight.dtype)
        v_img = self._heads(_linear(self.v_img, image))
        return CrossKV(k, v, k_img, v_img)

    def forward(self, x: torch.Tensor, kv: CrossKV) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]; no mask: padded text tokens are attended like the public code does."""
        q = self._heads(self.norm_q(_linear(self.q, x)))
        out = attention(q, kv.k, kv.v, cross_bias(kv.bias, kv.v.dtype))
        if kv.k_img is not None:
            out = out + attention(q, kv.k_img, kv.v_img)
        return _linear(self.o, out)


class AttentionBlock(nn.Module):
    """adaLN block: self-attention, cross-attention, FFN; six per-frame modulation vectors.

    Official naming: norm1 before self-attention, norm3 (the affine one) before cross-attention,
    norm2 before the FFN. diffusers swaps norm2 and norm3.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cross_kv: CrossKV, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, f, S, D] fp32 residual stream; e0 [B, f, 6, D] fp32 per-frame time projection."""
        return self.run(x, e0, cross_kv, BlockOps(cos, sin, mask))

    def run(self, x: torch.Tensor, e0: torch.Tensor, cross_kv: CrossKV, ops: "BlockOps", layer: int = 0) -> torch.Tensor:
        """The block's formula, once: x [B, f, S, D] fp32 residual stream, e0 [B, f, 6, D] fp32.
        `ops` computes the three sublayers (reference, KV-cached, or an export formulation); each
        returns its update in the residual stream's layout, fp32."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).split(1, dim=2)  # [B, f, 1, D]
        x = x + ops.self_attention(layer, self.self_attn, _modulate(self.norm1(x), shift1, scale1)) * gate1
        x = x + ops.cross_attention(self.cross_attn, self.norm3(x), cross_kv)
        return x + ops.feed_forward(self.ffn, _modulate(self.norm2(x), shift2, scale2)) * gate2


class BlockOps:
    """How AttentionBlock.run computes its sublayers: the reference arithmetic (full or masked
    self-attention among the tokens). Subclasses change how, never what: the KV-cached step
    (export/cached_step.py) adds cached keys/values, its export form uses fused graph ops.
    Inputs and outputs are [B, f, S, D]; outputs fp32."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None):
        self.cos, self.sin, self.mask = cos, sin, mask  # RoPE [L, Dh/2]; mask [L or 1, Lk] or None

    def keys_values(self, layer: int):
        """A SelfAttention keys_values hook for this layer, or None (attend to this call's tokens only)."""
        return None

    def self_attention(self, layer: int, attn: SelfAttention, h: torch.Tensor) -> torch.Tensor:
        return attn(h.flatten(1, 2), self.cos, self.sin, self.mask, self.keys_values(layer)).float().view_as(h)

    def cross_attention(self, cross: CrossAttention, h: torch.Tensor, kv: CrossKV) -> torch.Tensor:
        return cross(h.flatten(1, 2), kv).float().view_as(h)

    def feed_forward(self, ffn: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
        return _linear(ffn[2], ffn[1](_linear(ffn[0], h))).float()


class Head(nn.Module):
    """Output adaLN (shift, scale per frame from the time embedding) and projection to patches."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, f, S, D], e [B, f, D] time embedding -> [B, f, S, C*pt*ph*pw] fp32."""
        shift, scale = (self.modulation.float() + e[:, :, None]).split(1, dim=2)  # [B, f, 1, D]
        return _linear(self.head, _modulate(self.norm(x), shift, scale)).float()


class MLPProj(nn.Module):
    """CLIP image features [B, Li, 1280] -> image tokens [B, Li, D] (i2v only)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Sequential(
            LayerNorm32(CLIP_DIM), nn.Linear(CLIP_DIM, CLIP_DIM), nn.GELU(), nn.Linear(CLIP_DIM, cfg.dim),
            LayerNorm32(cfg.dim),
        )

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        norm_in, fc1, act, fc2, norm_out = self.proj
        return norm_out(_linear(fc2, act(_linear(fc1, norm_in(clip_fea)))))


# ----------------------------------------------------------------------------------------------
# The model


class WanDiT(nn.Module):
    """SkyReels-V2 / Wan2.1 DiT with official parameter names; see the module docstring."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        if cfg.inject_sample_info:
            self.fps_embedding = nn.Embedding(2, cfg.dim)  # class 0: 16 fps, class 1: anything else
            self.fps_projection = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(AttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.model_type == "i2v":
            self.img_emb = MLPProj(cfg)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    # -- conditioning (per step: time; per prompt: text/image) -------------------------------
    def embed_time(self, t: torch.Tensor, fps: Optional[torch.Tensor] = None, check_fps: bool = True):
        """Per-frame timesteps t [B, f] -> (e [B, f, D], e0 [B, f, 6, D]), both fp32.

        e feeds the head; e0 (plus each block's own table) the six block modulations.
        """
        return self.embed_sinusoid(timestep_sinusoid(t, self.config.freq_dim), fps, check_fps)

    def embed_sinusoid(self, t_emb: torch.Tensor, fps: Optional[torch.Tensor] = None, check_fps: bool = True):
        """embed_time from the timestep sinusoid t_emb [B, f, freq_dim] (the exported graphs' input).
        check_fps=False skips the host-side check of the fps values: a graph has no control flow on
        tensor values."""
        e = _linear32(self.time_embedding[2], F.silu(_linear32(self.time_embedding[0], t_emb.float())))
        e0 = _linear32(self.time_projection[1], F.silu(e)).unflatten(-1, (6, -1))
        if self.config.inject_sample_info:
            e0 = e0 + self.embed_fps(fps, t_emb.shape[0], check_fps)[:, None]
        return e, e0

    def embed_fps(self, fps, batch: int, check: bool = True) -> torch.Tensor:
        """fps class per sample (0 if fps == 16 else 1) -> modulation offset [B, 6, D] fp32 ([1, 6, D]
        for one class given unchecked: it broadcasts)."""
        if fps is None:
            raise ValueError("this checkpoint uses the fps embedding (inject_sample_info): pass fps classes "
                             "(0 for 16 fps, 1 otherwise)")
        fps = torch.as_tensor(fps, dtype=torch.long, device=self.fps_embedding.weight.device).reshape(-1)
        if check:
            fps = fps.expand(batch)
            if bool(((fps != 0) & (fps != 1)).any()):
                raise ValueError(f"fps classes must be 0 (16 fps) or 1 (other), got {fps.tolist()}")
        emb = self.fps_embedding.weight.float()[fps]  # [B, D]
        proj = self.fps_projection
        return _linear32(proj[2], F.silu(_linear32(proj[0], emb))).unflatten(-1, (6, -1))

    def embed_context(self, context: torch.Tensor, clip_fea: Optional[torch.Tensor] = None):
        """umT5 context [B, Lt, text_dim] (and CLIP [B, Li, 1280]) -> (text [B, Lt, D], image [B, Li, D] or None)."""
        text = _linear(self.text_embedding[2], self.text_embedding[1](_linear(self.text_embedding[0], context)))
        if self.config.model_type != "i2v":
            if clip_fea is not None:
                raise ValueError("clip_fea was given to a t2v model (model_type='t2v' has no image branch)")
            return text, None
        if clip_fea is None:
            raise ValueError("an i2v model needs clip_fea [B, 257, 1280]")
        return text, self.img_emb(clip_fea).to(text.dtype)

    def cross_attention_kv(self, context: torch.Tensor, clip_fea: Optional[torch.Tensor] = None,
                           collapse_padding: bool = False) -> list[CrossKV]:
        """All layers' cross-attention K/V for one prompt (compute once, reuse for every step).

        collapse_padding: keep one key of the identical padding rows at the end of the context,
        with a log(count) logit bias (exact; see collapse_padding). A short prompt then costs a few
        keys per query instead of 512. Off for the static-shape export graphs.
        """
        bias = None
        if collapse_padding:
            context, bias = collapse_padding_rows(context)
        text, image = self.embed_context(context, clip_fea)
        kvs = [block.cross_attn.context_kv(text, image) for block in self.blocks]
        return kvs if bias is None else [kv._replace(bias=bias.to(context.device)) for kv in kvs]

    # -- patches ---------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_dim, F, H, W] -> tokens [B, f, S, D] fp32 (row-major h, w inside a frame)."""
        tokens = self.patch_embedding(x.to(self.compute_dtype))  # [B, D, f, h, w]
        return tokens.flatten(3).permute(0, 2, 3, 1).float()

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """out [B, f, S, pt*ph*pw*C] -> [B, C, f*pt, h*ph, w*pw]; channel is the fastest patch index."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        out = out.reshape(out.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, f, pt, h, ph, w, pw]
        return out.reshape(out.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: Optional[torch.Tensor],
        fps: Optional[torch.Tensor] = None,
        clip_fea: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
        causal_block_size: Optional[int] = None,
        frame_offset: int = 0,
        cross_kv: Optional[Sequence[CrossKV]] = None,
    ) -> torch.Tensor:
        """Flow velocity for noisy latents.

        x: [B, C, F, H, W] latents; y: i2v conditioning latents concatenated on channels
        (C + C_y must equal in_dim); t: [B, F] per-frame timesteps in [0, 1000] (or [B]);
        context: [B, Lt, text_dim] (padded by the caller to text_len) or None when `cross_kv`
        (from cross_attention_kv) is given; fps: [B] fps classes, read only with inject_sample_info;
        clip_fea: [B, 257, 1280] for i2v; causal_block_size: None = full attention, k >= 1 =
        block-causal over latent frames in blocks of k; frame_offset: RoPE position of frame 0.
        Returns [B, out_dim, F, H, W] fp32.
        """
        cfg = self.config
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"input has {x.shape[1]} channels (x plus y), the model takes in_dim={cfg.in_dim}")
        B, _, num_frames, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        if num_frames % pt or H % ph or W % pw:
            raise ValueError(f"latent shape F,H,W = {num_frames},{H},{W} is not divisible by patch {cfg.patch_size}")
        grid = (num_frames // pt, H // ph, W // pw)
        f, h, w = grid

        t = torch.as_tensor(t, device=x.device)
        t = t[:, None].expand(B, f) if t.dim() == 1 else t
        if tuple(t.shape) != (B, f):
            raise ValueError(f"timesteps must be [B, F] = [{B}, {f}] (or [B]), got {tuple(t.shape)}")

        tokens = self.patchify(x)  # [B, f, S, D]
        e, e0 = self.embed_time(t, fps)
        if cross_kv is None:
            cross_kv = self.cross_attention_kv(context, clip_fea)
        cos, sin = rope_cos_sin(cfg.head_dim, torch.arange(f) + frame_offset, h, w, cfg.rope_max_positions)
        cos, sin = cos.to(x.device), sin.to(x.device)
        mask = None if causal_block_size is None else block_causal_mask(f, h * w, causal_block_size, x.device)

        tokens = self.run_blocks(tokens, e0, cross_kv, BlockOps(cos, sin, mask))
        return self.unpatchify(self.head(tokens, e), grid)

    def run_blocks(self, tokens: torch.Tensor, e0: torch.Tensor, cross_kv: Sequence[CrossKV],
                   ops: BlockOps) -> torch.Tensor:
        """The DiT's block loop, the one every forward runs (this reference, the KV-cached step and
        the exported graphs): tokens [B, f, S, D] fp32 -> [B, f, S, D] fp32."""
        if len(cross_kv) != len(self.blocks):
            raise ValueError(f"cross_kv has {len(cross_kv)} layers, the model {len(self.blocks)}")
        for layer, (block, kv) in enumerate(zip(self.blocks, cross_kv)):
            tokens = block.run(tokens, e0, kv, ops, layer)
        return tokens


# ----------------------------------------------------------------------------------------------
# Key maps: official checkpoint names <-> diffusers SkyReelsV2Transformer3DModel names

# (official module path, diffusers module path); matched on whole dotted components.
_TOP_LEVEL = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("fps_projection.0", "fps_projection.net.0.proj"),
    ("fps_projection.2", "fps_projection.net.2"),
)
_IN_BLOCK = (
    ("modulation", "scale_shift_table"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("norm3", "norm2"),  # the affine cross-attention norm: official norm3 is diffusers norm2
    ("norm2", "norm3"),  # (parameter-free in both; mapped for completeness)
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
)


def _rename(key: str, table, src: int) -> str:
    """Rewrite `key` with the first table entry whose side `src` is a whole-component prefix."""
    dst = 1 - src
    prefix, rest = "", key
    if key.startswith("blocks."):
        parts = key.split(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            prefix, rest, table = f"blocks.{parts[1]}.", parts[2], _IN_BLOCK
    for pair in table:
        old = pair[src]
        if rest == old or rest.startswith(old + "."):
            return prefix + pair[dst] + rest[len(old):]
    return key  # unmapped names pass through, so strict loading reports them as unexpected


def official_to_diffusers_key(key: str) -> str:
    """Official checkpoint key -> diffusers SkyReelsV2Transformer3DModel key."""
    return _rename(key, _TOP_LEVEL, src=0)


def diffusers_to_official_key(key: str) -> str:
    """diffusers SkyReelsV2Transformer3DModel key -> official checkpoint key."""
    return _rename(key, _TOP_LEVEL, src=1)


def convert_diffusers_state_dict(state: dict) -> dict:
    """A diffusers transformer state dict under the official names (what WanDiT loads)."""
    from .checkpoint import rename_keys

    return rename_keys(state, diffusers_to_official_key)


HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # export precisions -> torch dtypes


def cast_dit(dit: WanDiT, precision: str, in_place: bool = False) -> WanDiT:
    """The DiT an export of `precision` traces: fp32 as is; fp16/bf16 = a copy (in_place: `dit` itself)
    with the big matmuls in that dtype and the fp32 islands (norms, modulation tables, time/fps
    embeddings) kept fp32 in storage too."""
    if precision == "fp32":
        return dit
    half = (dit if in_place else copy.deepcopy(dit)).to(HALF_DTYPES[precision])
    keep = [half.time_embedding, half.time_projection]
    if half.config.inject_sample_info:
        keep += [half.fps_embedding, half.fps_projection]
    keep += [m for m in half.modules() if isinstance(m, (RMSNorm, LayerNorm32))]
    for module in keep:
        module.float()
    with torch.no_grad():
        for name, param in half.named_parameters():
            if name.endswith("modulation"):
                param.data = param.data.float()
    return half
