"""Torch reference of the KV-cached DiT step of the `kvcache` rollout (runtime/kvcache.py drives it).

One call denoises the ACTIVE frames (a block, or a few blocks in flight) against a KV cache of
finished blocks. It is the function that gets exported to ONNX/TensorRT, so:
- all shapes are static (cache capacity S tokens, active f frames, H, W); which cache tokens hold
  data is a bool validity mask, not a slice;
- no position logic in the graph: the caller passes the RoPE cos/sin of the active tokens
  (`active_rope`), and the cached keys are stored already rotated at their own positions;
- no Python control flow on tensor values.

Semantics (exact for block-causal checkpoints): in every layer the self-attention of the active
tokens attends to [valid cached tokens ; active tokens], the active tokens block-causal among
themselves when `causal_block_size` is given. Attention is order-free over keys, so the cache slots
may hold blocks in any order (ring eviction is an overwrite). The step also returns the active
tokens' own K (rotated) and V per layer: when the active block is run at t=0 (the clean-pass
commit), those are exactly what a block-causal full forward computes for it, and the caller writes
them into a free/evicted slot (skyrt._core.kv_write_block).

Window mode is this step with no cached context: cache_k = cache_v = None (S = 0), every frame of the
window active, full or block-causal attention among them, and no K/V to keep (new_k, new_v None). The
window graphs (dit_window, dit_window_causal) are exported from it.

Cache layout: cache_k / cache_v [layers, B, S, heads, head_dim] in the compute dtype (or fp32).
For one sample, cache_k[:, b] viewed as [layers, slots, tokens_per_block, heads, head_dim] is the
layout of skyrt._core.KVRing / kv_write_block / kv_rope_rebase; S = slots * tokens_per_block.

Invalid slots: by default their contents must be FINITE (zero the buffers once at allocation;
evicted data is finite): a masked score is -inf but NaN/Inf garbage still poisons softmax and the
probability-weighted sum. `CachedStep(dit, zero_invalid=True)` zeroes invalid cache entries in the
graph (one extra elementwise pass over the cache per layer) and then tolerates any garbage.

Run its tests: python -m pytest tests/test_cached_step.py -q
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dit import BlockOps, CrossKV, WanDiT, block_causal_mask, cross_bias, rope_cos_sin


def active_rope(dit: WanDiT, first_frame_position: int, num_frames: int, h: int, w: int):
    """RoPE (cos, sin), each fp32 [num_frames*h*w, head_dim//2], for active frames at temporal positions
    first_frame_position .. first_frame_position + num_frames - 1 on an h x w TOKEN grid (latent H, W
    divided by the patch size). Positions are relative to the ring's origin (KVRing.position_of)."""
    cfg = dit.config
    positions = torch.arange(num_frames, dtype=torch.long) + int(first_frame_position)
    return rope_cos_sin(cfg.head_dim, positions, h, w, cfg.rope_max_positions)


GRAPH_FORMS = (None, "onnx", "onnx-ort")  # CachedStep(graph=...): eager torch, or an export formulation


def _fused_linear(layers: Sequence[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """x [..., in] through the Linears side by side (outputs concatenated) as one 2-D matmul in their
    weight dtype: [prod(...), sum(out)]. Exported, a 2-D linear is one Gemm with its bias, and the
    reshape to 2-D takes a constant shape (no Shape ops)."""
    weight = torch.cat([layer.weight for layer in layers]) if len(layers) > 1 else layers[0].weight
    bias = torch.cat([layer.bias for layer in layers]) if len(layers) > 1 else layers[0].bias
    return F.linear(x.reshape(-1, weight.shape[1]).to(weight.dtype), weight, bias)


def _attend_onnx(q, k, v, bias, batch, num_heads: int, head_dim: int):
    """Softmax attention with the scale already in q: q [B, Lq, N*Dh], k/v [B, Lk, N*Dh], additive bias
    [B or 1, 1 or N, Lq, Lk] or None -> [B, Lq, N*Dh]; plain ONNX ops (TensorRT builds them). `batch`
    is B as traced once per graph (ORT then merges the shape computations of every layer)."""
    q, k, v = (x.reshape(batch, -1, num_heads, head_dim) for x in (q, k, v))
    scores = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1))
    if bias is not None:
        scores = scores + bias
    out = torch.matmul(torch.softmax(scores, dim=-1), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(batch, -1, num_heads * head_dim)


def _optional_input(g):
    """An omitted optional input of an ONNX node (exported as the empty name)."""
    node = g.op("prim::Constant")
    node.setType(torch._C.OptionalType.ofTensor())
    return node


class _OrtMultiHeadAttention(torch.autograd.Function):
    """_attend_onnx exported as one com.microsoft MultiHeadAttention node: onnxruntime's contrib op
    (3-D [B, S, N*Dh] query/key/value, no transposes; scale 1 because q carries it). TensorRT cannot
    build it. Eager, it is _attend_onnx."""

    @staticmethod
    def forward(ctx, q, k, v, num_heads: int):
        return _attend_onnx(q, k, v, None, q.shape[0], num_heads, q.shape[-1] // num_heads)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=num_heads, scale_f=1.0)
        out.setType(q.type())  # [B, Lq, N*Dh] like q (the exporter cannot infer a contrib op's shape)
        return out


class _OrtMultiHeadAttentionBias(torch.autograd.Function):
    """_OrtMultiHeadAttention with an additive attention_bias [B or 1, 1 or N, Lq, Lk]."""

    @staticmethod
    def forward(ctx, q, k, v, bias, num_heads: int):
        return _attend_onnx(q, k, v, bias, q.shape[0], num_heads, q.shape[-1] // num_heads)

    @staticmethod
    def symbolic(g, q, k, v, bias, num_heads: int):
        # inputs: query, key, value, bias (of the projections), key_padding_mask, attention_bias
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, _optional_input(g), _optional_input(g), bias,
                   num_heads_i=num_heads, scale_f=1.0)
        out.setType(q.type())
        return out


class _OrtFastGelu(torch.autograd.Function):
    """GELU, tanh approximation (the FFN's), exported as one com.microsoft FastGelu node instead of
    the nine elementwise ops of its formula."""

    @staticmethod
    def forward(ctx, x):
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def symbolic(g, x):
        out = g.op("com.microsoft::FastGelu", x)
        out.setType(x.type())
        return out


def _attend_ort(q, k, v, bias, batch, num_heads: int, head_dim: int):
    """_attend_onnx through onnxruntime's MultiHeadAttention (see _OrtMultiHeadAttention)."""
    if bias is None:
        return _OrtMultiHeadAttention.apply(q, k, v, num_heads)
    return _OrtMultiHeadAttentionBias.apply(q, k, v, bias, num_heads)


def token_valid(slot_valid, tokens_per_slot: int) -> torch.Tensor:
    """Slot validity ([slots] or [B, slots], e.g. KVRing.valid) -> token validity [.., slots*tokens_per_slot]."""
    slot_valid = torch.as_tensor(slot_valid, dtype=torch.bool)
    return slot_valid.repeat_interleave(tokens_per_slot, dim=-1)


class CachedStep(nn.Module):
    """The KV-cached DiT step; wraps (and shares the weights of) a WanDiT. See the module docstring."""

    def __init__(self, dit: WanDiT, zero_invalid: bool = False, graph: Optional[str] = None):
        super().__init__()
        if graph not in GRAPH_FORMS:
            raise ValueError(f"graph={graph!r} is not one of {GRAPH_FORMS}")
        self.dit = dit
        self.zero_invalid = bool(zero_invalid)
        self.graph = graph

    @property
    def config(self):
        return self.dit.config

    def embed_time(self, t: torch.Tensor, fps: Optional[torch.Tensor]):
        """WanDiT.embed_time without the host-side fps value check (no control flow on tensor values).
        fps: [B] (or scalar) class per sample, 0 = 16 fps, 1 = other; required with inject_sample_info."""
        return self.dit.embed_time(t, fps, check_fps=False)

    def forward(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cross_kv: Sequence[CrossKV],
        cache_k: Optional[torch.Tensor],
        cache_v: Optional[torch.Tensor],
        cache_valid: Optional[torch.Tensor],
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        fps: Optional[torch.Tensor] = None,
        causal_block_size: Optional[int] = None,
        y: Optional[torch.Tensor] = None,
        attention_bias: Optional[torch.Tensor] = None,
    ):
        """latents [B, C, f, H, W] of the active frames (y: i2v conditioning latents of the same frames,
        concatenated on channels); t [B, f] per-frame timesteps; cross_kv: WanDiT.cross_attention_kv
        output (one CrossKV per layer); cache_k/cache_v [layers, B, S, N, Dh], or None for a window step
        (no cached context); cache_valid bool [B, S] or [S], or None when every cache token is valid
        (S may be 0); rope_cos/rope_sin [f*h*w, Dh/2] of the active tokens (active_rope); fps [B] classes
        (inject_sample_info only); causal_block_size: None = full attention among the active tokens,
        k = block-causal in blocks of k frames (a static int, baked into an exported graph);
        attention_bias: a ready additive self-attention bias over [cache ; active] keys, [B or 1, 1,
        L or 1, S + L] in the compute dtype (0 = attend, -inf = not), which replaces the mask of
        cache_valid / causal_block_size (the fixed-shape step, export/static_step.py, builds it from
        static buffers; zero_invalid does not apply to it).

        Returns (velocity [B, out_dim, f, H, W] fp32, new_k, new_v [layers, B, f*h*w, N, Dh]) where
        new_k are the active tokens' keys normed and rotated at their positions, in the compute dtype;
        a window step (cache None) returns (velocity, None, None).
        """
        dit, cfg = self.dit, self.dit.config
        x = latents if y is None else torch.cat([latents, y.to(latents.dtype)], dim=1)
        B, _, num_frames, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        f, h, w = num_frames // pt, H // ph, W // pw
        S = 0 if cache_k is None else cache_k.shape[2]

        tokens = dit.patchify(x)  # [B, f, hw, D] fp32
        e, e0 = self.embed_time(t, fps)

        if attention_bias is not None:
            mask, keep = attention_bias, None
        else:
            mask, keep = self._attention_mask(cache_valid, B, S, f, h * w, causal_block_size, x.device)
        if mask is not None and mask.dtype == torch.bool:
            # Once per step, an additive bias instead of a boolean mask: exported, a boolean mask
            # becomes a Where over every layer's [B, N, L, S + L] scores plus a NaN guard (about a
            # fifth of the ORT step's time at the benchmark size); a bias is one Add. Every row
            # keeps its own tokens, so no row is all -inf.
            mask = torch.zeros(mask.shape, dtype=dit.compute_dtype, device=x.device).masked_fill(~mask, float("-inf"))

        if self.graph is None:
            ops = _CachedOps(rope_cos, rope_sin, mask, cache_k, cache_v, keep, self.zero_invalid)
        else:
            ops = _CachedGraphOps(self.graph, cfg, tokens.shape[:3], rope_cos, rope_sin, mask, cache_k, cache_v, keep,
                                  self.zero_invalid)
        tokens = dit.run_blocks(tokens, e0, cross_kv, ops)
        velocity = dit.unpatchify(dit.head(tokens, e), (f, h, w))
        if cache_k is None:  # a window step: nothing to commit
            return velocity, None, None
        return velocity, torch.stack(ops.new_k), torch.stack(ops.new_v)

    @staticmethod
    def _attention_mask(cache_valid, B: int, S: int, f: int, tokens_per_frame: int, causal_block_size, device):
        """Self-attention mask [B, 1, L, S + L] (valid cache tokens, then the active tokens among
        themselves) and the [B, S, 1, 1] keep-mask of zero_invalid; (None, None) when nothing is masked
        (cache_valid None = every cache token valid, and one block or full attention among the active
        frames), which lets SDPA take its unmasked kernel. Decided from shapes only."""
        L = f * tokens_per_frame
        active_full = causal_block_size is None or f <= causal_block_size
        if cache_valid is None and active_full:
            return None, None
        if S == 0:  # a window step: only the block-causal mask among its frames, for every sample
            return block_causal_mask(f, tokens_per_frame, causal_block_size, device)[None, None], None
        if cache_valid is None:
            valid = torch.ones(B, S, dtype=torch.bool, device=device)
        else:
            valid = cache_valid.to(torch.bool).reshape(-1, S).expand(B, S)
        if active_full:
            active = torch.ones(L, L, dtype=torch.bool, device=device)
        else:
            active = block_causal_mask(f, tokens_per_frame, causal_block_size, device)
        mask = torch.cat([valid[:, None, :].expand(B, L, S), active[None].expand(B, L, L)], dim=2)[:, None]
        return mask, (None if cache_valid is None else valid[:, :, None, None])


class _CachedOps(BlockOps):
    """The block's sublayers in the KV-cached step, eager: the self-attention of the active tokens
    attends to [cached keys ; their own], and their own keys/values are kept for the caller."""

    def __init__(self, cos, sin, mask, cache_k, cache_v, keep, zero_invalid: bool):
        super().__init__(cos, sin, mask)
        self.cache_k, self.cache_v = cache_k, cache_v  # [layers, B, S, N, Dh], or None (a window step)
        self.keep = keep if zero_invalid else None  # [B, S, 1, 1] bool: zero the invalid cache entries
        self.new_k: list[torch.Tensor] = []  # per layer [B, L, N, Dh], compute dtype
        self.new_v: list[torch.Tensor] = []

    def keys_values(self, layer: int):
        return lambda k, v: self.extend(layer, k, v)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """This layer's new k, v [B, L, N, Dh] (compute dtype) -> [cached ; new] [B, S + L, N, Dh]."""
        self.new_k.append(k)
        self.new_v.append(v)
        if self.cache_k is None:  # a window step attends to its own tokens only
            return k, v
        ck, cv = (cache.to(v.dtype) for cache in self._layer_cache(layer))
        if self.keep is not None:
            ck = torch.where(self.keep, ck, torch.zeros((), dtype=ck.dtype, device=ck.device))
            cv = torch.where(self.keep, cv, torch.zeros((), dtype=cv.dtype, device=cv.device))
        return torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)

    def _layer_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cached keys and values, [B, S, N, Dh] each."""
        return self.cache_k[layer], self.cache_v[layer]


class _CachedGraphOps(_CachedOps):
    """_CachedOps as the exported graph computes them (`graph` "onnx" or "onnx-ort"): the same
    arithmetic up to fp32 summation order, in fewer, larger graph ops:
    - tokens flattened to [B*L, D] around every linear, so each exports as one Gemm with its bias;
    - q, k and v of the self-attention from one Gemm over the concatenated weights;
    - RoPE as x * cos + (x @ P) * sin with P the signed pair swap (exact: P's products are x
      or -x or 0) and cos/sin repeated per pair, instead of gathering even/odd channels and
      stacking them back;
    - the softmax scale folded into the query (its RoPE tables, or its norm for the cross-attention);
    - "onnx-ort": both attentions as onnxruntime's com.microsoft MultiHeadAttention (its CPU
      kernel skips the transposes), which TensorRT cannot build."""

    def __init__(self, graph: str, cfg, token_shape, rope_cos, rope_sin, bias, cache_k, cache_v, keep,
                 zero_invalid: bool):
        super().__init__(None, None, bias, cache_k, cache_v, keep, zero_invalid)
        # traced once: every reshape below reuses them (ORT merges the copies)
        self.B, self.f, self.hw = token_shape
        self.L = L = self.f * self.hw
        self.D, self.N, self.Dh = cfg.dim, cfg.num_heads, cfg.head_dim  # python ints: constant shapes
        Dh = self.Dh
        self.scale = Dh ** -0.5
        self.attend = _attend_ort if graph == "onnx-ort" else _attend_onnx
        self.gelu = _OrtFastGelu.apply if graph == "onnx-ort" else None
        # cos/sin [L, Dh/2] -> [L, 1, Dh], each angle twice (both channels of its pair), over all heads.
        # (Not repeat_interleave: its export corrupted an unrelated unflatten's constant, torch 2.13.)
        self.cos = torch.stack([rope_cos.float()] * 2, dim=2).reshape(L, 1, Dh)
        self.sin = torch.stack([rope_sin.float()] * 2, dim=2).reshape(L, 1, Dh)
        self.qcos, self.qsin = self.cos * self.scale, self.sin * self.scale
        # (x @ swap)[2i] = -x[2i+1], (x @ swap)[2i+1] = x[2i]: RoPE's rotation by 90 degrees
        self.swap = torch.kron(torch.eye(Dh // 2), torch.tensor([[0.0, 1.0], [-1.0, 0.0]])).to(rope_cos.device)
        # [1, B, S, N, Dh] per layer: one Split each, not a Gather per layer (None: a window step)
        if cache_k is not None:
            self.caches_k, self.caches_v = cache_k.split(1), cache_v.split(1)

    def _layer_cache(self, layer):
        # [1, B, S, N, Dh] -> [B, S, N, Dh] by a reshape (an index would export as a copying Gather)
        return tuple(caches[layer].reshape(self.B, -1, self.N, self.Dh) for caches in (self.caches_k, self.caches_v))

    def _rope(self, x, c, s):  # x [B*L, D] -> [B, L, N, Dh] fp32
        x = x.float().reshape(self.B, self.L, self.N, self.Dh)
        return x * c + torch.matmul(x, self.swap) * s

    def _stream(self, x):  # [B*L, D] -> [B, f, hw, D] fp32, the residual stream's layout
        return x.float().reshape(self.B, self.f, self.hw, self.D)

    def self_attention(self, layer, attn, h):
        B, L, D = self.B, self.L, self.D
        q, k, v = _fused_linear((attn.q, attn.k, attn.v), h).split(D, dim=-1)  # [B*L, D] each
        q = self._rope(attn.norm_q(q), self.qcos, self.qsin)
        k = self._rope(attn.norm_k(k), self.cos, self.sin).to(v.dtype)
        keys, values = self.extend(layer, k, v.reshape(B, L, self.N, self.Dh))
        out = self.attend(q.to(v.dtype).reshape(B, L, D), keys.reshape(B, -1, D), values.reshape(B, -1, D),
                          self.mask, B, self.N, self.Dh)  # [B, L, D]
        return self._stream(_fused_linear((attn.o,), out))

    def cross_attention(self, cross, h, kv):
        B, L, D = self.B, self.L, self.D
        q = cross.norm_q(_fused_linear((cross.q,), h)).float() * self.scale
        out = self.attend(q.to(kv.v.dtype).reshape(B, L, D), kv.k.reshape(B, -1, D), kv.v.reshape(B, -1, D),
                          cross_bias(kv.bias, kv.v.dtype), B, self.N, self.Dh)
        return self._stream(_fused_linear((cross.o,), out))

    def feed_forward(self, ffn, h):
        hid = _fused_linear((ffn[0],), h)
        hid = ffn[1](hid) if self.gelu is None else self.gelu(hid)
        return self._stream(_fused_linear((ffn[2],), hid))
