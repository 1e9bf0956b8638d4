"""Torch reference of the KV-cached DiT step of the `kvcache` rollout (DESIGN.md section 4).

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

from .dit import (CrossKV, WanDiT, _linear, _linear32, _modulate, attention, block_causal_mask, rope_cos_sin,
                  timestep_sinusoid)


def active_rope(dit: WanDiT, first_frame_position: int, num_frames: int, h: int, w: int):
    """RoPE (cos, sin), each fp32 [num_frames*h*w, head_dim//2], for active frames at temporal positions
    first_frame_position .. first_frame_position + num_frames - 1 on an h x w TOKEN grid (latent H, W
    divided by the patch size). Positions are relative to the ring's origin (KVRing.position_of)."""
    cfg = dit.config
    positions = torch.arange(num_frames, dtype=torch.long) + int(first_frame_position)
    return rope_cos_sin(cfg.head_dim, positions, h, w, cfg.rope_max_positions)


def token_valid(slot_valid, tokens_per_slot: int) -> torch.Tensor:
    """Slot validity ([slots] or [B, slots], e.g. KVRing.valid) -> token validity [.., slots*tokens_per_slot]."""
    slot_valid = torch.as_tensor(slot_valid, dtype=torch.bool)
    return slot_valid.repeat_interleave(tokens_per_slot, dim=-1)


class CachedStep(nn.Module):
    """The KV-cached DiT step; wraps (and shares the weights of) a WanDiT. See the module docstring."""

    def __init__(self, dit: WanDiT, zero_invalid: bool = False):
        super().__init__()
        self.dit = dit
        self.zero_invalid = bool(zero_invalid)

    @property
    def config(self):
        return self.dit.config

    def embed_time(self, t: torch.Tensor, fps: Optional[torch.Tensor]):
        """WanDiT.embed_time without the host-side fps value check (no control flow on tensor values).
        fps: [B] (or scalar) class per sample, 0 = 16 fps, 1 = other; required with inject_sample_info."""
        dit, cfg = self.dit, self.dit.config
        sinusoid = timestep_sinusoid(t, cfg.freq_dim)  # float64 angles: host-side for TensorRT
        e = _linear32(dit.time_embedding[2], F.silu(_linear32(dit.time_embedding[0], sinusoid)))
        e0 = _linear32(dit.time_projection[1], F.silu(e)).unflatten(-1, (6, -1))
        if cfg.inject_sample_info:
            if fps is None:
                raise ValueError("this checkpoint uses the fps embedding (inject_sample_info): pass fps classes")
            fps = torch.as_tensor(fps, dtype=torch.long, device=t.device).reshape(-1).expand(t.shape[0])
            emb = dit.fps_embedding.weight.float()[fps]  # [B, D]
            proj = dit.fps_projection
            e0 = e0 + _linear32(proj[2], F.silu(_linear32(proj[0], emb))).unflatten(-1, (6, -1))[:, None]
        return e, e0

    def forward(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cross_kv: Sequence[CrossKV],
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        cache_valid: Optional[torch.Tensor],
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        fps: Optional[torch.Tensor] = None,
        causal_block_size: Optional[int] = None,
        y: Optional[torch.Tensor] = None,
    ):
        """latents [B, C, f, H, W] of the active frames (y: i2v conditioning latents of the same frames,
        concatenated on channels); t [B, f] per-frame timesteps; cross_kv: WanDiT.cross_attention_kv
        output (one CrossKV per layer); cache_k/cache_v [layers, B, S, N, Dh]; cache_valid bool [B, S]
        or [S], or None when every cache token is valid (S may be 0); rope_cos/rope_sin [f*h*w, Dh/2] of the active tokens (active_rope); fps [B] classes
        (inject_sample_info only); causal_block_size: None = full attention among the active tokens,
        k = block-causal in blocks of k frames (a static int, baked into an exported graph).

        Returns (velocity [B, out_dim, f, H, W] fp32, new_k, new_v [layers, B, f*h*w, N, Dh]) where
        new_k are the active tokens' keys normed and rotated at their positions, in the compute dtype.
        """
        dit, cfg = self.dit, self.dit.config
        x = latents if y is None else torch.cat([latents, y.to(latents.dtype)], dim=1)
        B, _, num_frames, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        f, h, w = num_frames // pt, H // ph, W // pw
        L = f * h * w
        S = cache_k.shape[2]
        if len(cross_kv) != len(dit.blocks):
            raise ValueError(f"cross_kv has {len(cross_kv)} layers, the model {len(dit.blocks)}")

        tokens = dit.patchify(x)  # [B, f, hw, D] fp32
        e, e0 = self.embed_time(t, fps)

        mask, keep = self._attention_mask(cache_valid, B, S, f, h * w, causal_block_size, x.device)
        if mask is not None:
            # Once per step, an additive bias instead of a boolean mask: exported, a boolean mask
            # becomes a Where over every layer's [B, N, L, S + L] scores plus a NaN guard (about a
            # fifth of the ORT step's time at the benchmark size); a bias is one Add. Every row
            # keeps its own tokens, so no row is all -inf.
            mask = torch.zeros(mask.shape, dtype=dit.compute_dtype, device=x.device).masked_fill(~mask, float("-inf"))

        new_k, new_v = [], []
        for layer, (block, kv) in enumerate(zip(dit.blocks, cross_kv)):
            shift1, scale1, gate1, shift2, scale2, gate2 = (block.modulation.float() + e0).unbind(dim=2)

            hid = _modulate(block.norm1(tokens), shift1, scale1).flatten(1, 2)  # [B, L, D]
            attn = block.self_attn
            q, k, v = attn.project_qkv(hid, rope_cos, rope_sin)
            k = k.to(v.dtype)
            ck, cv = cache_k[layer].to(v.dtype), cache_v[layer].to(v.dtype)
            if self.zero_invalid and keep is not None:
                ck = torch.where(keep, ck, torch.zeros((), dtype=ck.dtype, device=ck.device))
                cv = torch.where(keep, cv, torch.zeros((), dtype=cv.dtype, device=cv.device))
            out = attention(q, torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1), mask)
            tokens = tokens + _linear(attn.o, out).float().view_as(tokens) * gate1[:, :, None]
            new_k.append(k)
            new_v.append(v)

            hid = block.norm3(tokens).flatten(1, 2)
            tokens = tokens + block.cross_attn(hid, kv).float().view_as(tokens)

            hid = _modulate(block.norm2(tokens), shift2, scale2)
            ffn = block.ffn
            tokens = tokens + _linear(ffn[2], ffn[1](_linear(ffn[0], hid))).float() * gate2[:, :, None]

        velocity = dit.unpatchify(dit.head(tokens, e), (f, h, w))
        return velocity, torch.stack(new_k), torch.stack(new_v)

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
