"""Traceable torch modules of Qwen2.5-VL's two networks, sharing the transformers model's weights.

transformers' vision tower splits attention by `cu_seqlens` with Python loops over `.tolist()` and
the decoder reads its cache object: neither traces into a fixed graph. These modules compute the
same functions with everything data-dependent supplied by the host (skyrt.runtime.captioner):

VisionGraph (one image or video, N patches, natural patch order throughout):
    pixel_values  [N, 3*2*14*14]   compute dtype
    rope_cos/sin  [N, head_dim]    fp32     2D rotary of each patch
    window_gather [W, Lw] int64, window_valid [W, Lw] bool, window_scatter [N] int64
    frame_gather  [F, Lf] int64, frame_valid  [F, Lf] bool, frame_scatter  [N] int64
    -> features   [N / 4, out_hidden] compute dtype (merged tokens, in the order of the pad tokens)
  Attention runs per segment: tokens are gathered into [segments, L] (padding masked out of the
  keys), attended, and scattered back. Windowed layers use windows, the full-attention layers
  (fullatt_block_indexes) one segment per temporal patch, as transformers' cu_seqlens do.
  transformers permutes tokens into window order and back; attention does not depend on the order
  of its tokens, so keeping patch order gives the same result without the permutation.

DecoderGraph (batch 1, P cached + S new tokens):
    inputs_embeds [1, S, hidden] compute dtype, position_ids [3, 1, S] int64 (mrope t/h/w),
    past_key_i / past_value_i [1, kv_heads, P, head_dim] for each layer i
    -> logits [1, vocab] fp32 of the last token, present_key_i / present_value_i [1, kv_heads, P+S, head_dim]
  Causal over the P + S keys; P = 0 is the prefill. RoPE angles come from the position ids in the
  graph (fp32, mrope sections interleaved as transformers does).

Precision: fp32 graphs are the reference. fp16 graphs run the linear layers and attention matmuls
in fp16 and keep RMS norms, rotary, softmax and the logits in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm in fp32, result in x's dtype (transformers: normalise in fp32, scale by the gain)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in fp32 (cos/sin broadcast against x), back to x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def segment_attention(q, k, v, gather, valid, scatter, scale: float) -> torch.Tensor:
    """Attention within segments. q, k, v [N, H, D]; gather/valid [S, L]; scatter [N] -> [N, H*D].

    Padded key slots get -inf-like scores (every segment has at least one real token, so no row
    is all masked); padded query rows are computed and dropped by the scatter."""
    n, heads, dim = q.shape
    qs, ks, vs = (t[gather].transpose(1, 2) for t in (q, k, v))  # [S, H, L, D]
    scores = torch.matmul(qs, ks.transpose(-1, -2)).float() * scale  # [S, H, L, L] fp32
    scores = scores.masked_fill(~valid[:, None, None, :], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, vs).transpose(1, 2)  # [S, L, H, D]
    return out.reshape(-1, heads * dim)[scatter]


class VisionGraph(nn.Module):
    """Qwen2.5-VL's vision tower + patch merger with host-side segments (see the module docstring)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        cfg = visual.config
        self.full_layers = set(int(i) for i in cfg.fullatt_block_indexes)
        self.heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.merge_unit = cfg.spatial_merge_size ** 2

    def forward(self, pixel_values, rope_cos, rope_sin, window_gather, window_valid, window_scatter,
                frame_gather, frame_valid, frame_scatter):
        visual = self.visual
        proj = visual.patch_embed.proj  # Conv3d with stride = kernel: one matmul per patch row
        x = F.linear(pixel_values.to(proj.weight.dtype), proj.weight.flatten(1))  # [N, hidden]
        cos, sin = rope_cos[:, None, :], rope_sin[:, None, :]  # [N, 1, D] fp32
        for index, block in enumerate(visual.blocks):
            full = index in self.full_layers
            gather, valid, scatter = ((frame_gather, frame_valid, frame_scatter) if full
                                      else (window_gather, window_valid, window_scatter))
            attn = block.attn
            h = rms_norm(x, block.norm1.weight, block.norm1.variance_epsilon)
            qkv = attn.qkv(h).reshape(-1, 3, self.heads, self.head_dim)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, H, D]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            x = x + attn.proj(segment_attention(q, k, v, gather, valid, scatter, attn.scaling))
            x = x + block.mlp(rms_norm(x, block.norm2.weight, block.norm2.variance_epsilon))
        merger = visual.merger
        h = rms_norm(x, merger.ln_q.weight, merger.ln_q.variance_epsilon).reshape(-1, merger.hidden_size)
        return merger.mlp(h)  # [N / 4, out_hidden]


class DecoderGraph(nn.Module):
    """Qwen2.5-VL's language model (+ lm_head on the last token) with explicit past/present K/V."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.lm = language_model
        self.lm_head = lm_head
        cfg = language_model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        rotary = language_model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.mrope_section = [int(s) for s in rotary.mrope_section]
        self.scale = self.head_dim ** -0.5

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [3, 1, S] -> cos, sin [1, 1, S, head_dim] fp32: temporal, height and width
        angles take turns over the mrope sections of the frequency axis."""
        freqs = position_ids[..., None].float() * self.inv_freq  # [3, 1, S, D/2]
        pieces, start = [], 0
        for i, size in enumerate(self.mrope_section):
            pieces.append(freqs[i % 3, :, :, start:start + size])
            start += size
        freqs = torch.cat(pieces, dim=-1)  # [1, S, D/2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [1, 1, S, D]
        return angles.cos(), angles.sin()

    def forward(self, inputs_embeds, position_ids, *past):
        x = inputs_embeds  # [1, S, hidden]
        new = x.shape[1]
        cos, sin = self.rotary(position_ids)
        presents = []
        mask = None
        for index, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            h = rms_norm(x, layer.input_layernorm.weight, self.eps)
            q = attn.q_proj(h).reshape(1, new, self.heads, self.head_dim).transpose(1, 2)  # [1, H, S, D]
            k = attn.k_proj(h).reshape(1, new, self.kv_heads, self.head_dim).transpose(1, 2)  # [1, KV, S, D]
            v = attn.v_proj(h).reshape(1, new, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            k = torch.cat([past[2 * index], k], dim=2)  # [1, KV, P+S, D]
            v = torch.cat([past[2 * index + 1], v], dim=2)
            presents += [k, v]
            if mask is None:
                total = k.shape[2]
                # Query i (absolute P + i) sees keys 0 .. P + i.
                query_pos = torch.arange(new, device=x.device) + (total - new)
                mask = torch.arange(total, device=x.device)[None, :] <= query_pos[:, None]  # [S, P+S]
            rep = self.heads // self.kv_heads  # grouped-query attention: each K/V head serves `rep` heads
            kr = k[:, :, None].expand(1, self.kv_heads, rep, k.shape[2], self.head_dim).reshape(
                1, self.heads, k.shape[2], self.head_dim)
            vr = v[:, :, None].expand(1, self.kv_heads, rep, v.shape[2], self.head_dim).reshape(
                1, self.heads, v.shape[2], self.head_dim)
            scores = torch.matmul(q, kr.transpose(-1, -2)).float() * self.scale  # [1, H, S, P+S] fp32
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            out = torch.matmul(probs, vr).transpose(1, 2).reshape(1, new, self.heads * self.head_dim)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(rms_norm(x, layer.post_attention_layernorm.weight, self.eps))
        last = rms_norm(x[:, -1], self.lm.norm.weight, self.eps)  # [1, hidden]
        logits = F.linear(last, self.lm_head.weight).float()  # [1, vocab]
        return (logits, *presents)
