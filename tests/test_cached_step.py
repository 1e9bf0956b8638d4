"""Exactness tests of skyrt.export.cached_step (the KV-cached DiT step) against WanDiT.forward, fp32,
tiny random WanDiT with every parameter randomized. CPU only, a few seconds.

(a) empty cache + whole window, block-causal == WanDiT.forward(causal_block_size=b);
(b) earlier blocks committed at t=0 one by one (each against the cache of the ones before, written
    into shuffled ring slots with skyrt._core.kv_write_block, garbage in the unused slots) + the last
    block active == the last block of a block-causal full forward whose earlier frames are at t=0;
(c) RoPE rebase: cached keys rotated by -shift (skyrt._core.kv_rope_rebase) and active positions
    shifted by -shift give the same velocity.
Run: python -m pytest tests/test_cached_step.py -q
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from checkpoints import randomize_scaled_ as randomize_

from skyrt.export import dit as D
from skyrt.export.cached_step import CachedStep, active_rope, token_valid

TOL = 1e-4
CFG = replace(D.TINY, inject_sample_info=True)  # covers the fps path too
I2V = replace(CFG, model_type="i2v", in_dim=36)
B, H, W = 2, 4, 6  # token grid h x w = 2 x 3
HT, WT = H // 2, W // 2
TPF = HT * WT  # tokens per frame




def make(cfg=CFG, seed=0):
    dit = randomize_(D.WanDiT(cfg), seed).eval()
    return dit, CachedStep(dit).eval()


def data(cfg, frames, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, frames, H, W, generator=g)
    t = torch.rand(B, frames, generator=g) * 1000
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    y = torch.randn(B, cfg.in_dim - 16, frames, H, W, generator=g) if cfg.in_dim > 16 else None
    clip = torch.randn(B, 257, D.CLIP_DIM, generator=g) if cfg.model_type == "i2v" else None
    return x, t, ctx, y, clip


FPS = torch.tensor([0, 1])


def empty_cache(cfg, slots, tokens_per_slot, fill=1e3, seed=5):
    """[layers, B, S, N, Dh] K and V full of large finite garbage, and an all-invalid [B, S] mask."""
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.num_layers, B, slots * tokens_per_slot, cfg.num_heads, cfg.head_dim)
    return (fill * torch.randn(shape, generator=g), fill * torch.randn(shape, generator=g),
            torch.zeros(B, slots * tokens_per_slot, dtype=torch.bool))


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("cfg,block", [(CFG, 1), (CFG, 2), (CFG, None), (I2V, 2)], ids=["b1", "b2", "full", "i2v-b2"])
def test_empty_cache_equals_full_forward(cfg, block):
    dit, step = make(cfg)
    frames = 4
    x, t, ctx, y, clip = data(cfg, frames)
    want = dit(x, t, ctx, fps=FPS, clip_fea=clip, y=y, causal_block_size=block)
    kv = dit.cross_attention_kv(ctx, clip)
    ck, cv, valid = empty_cache(cfg, slots=3, tokens_per_slot=TPF)
    cos, sin = active_rope(dit, 0, frames, HT, WT)
    got, nk, nv = step(x, t, kv, ck, cv, valid, cos, sin, fps=FPS, causal_block_size=block, y=y)
    err = max_diff(got, want)
    print(f"(a) block={block} {cfg.model_type}: max diff {err:.2e} (max |v| {want.abs().max():.2f})")
    assert err < TOL
    shape = (cfg.num_layers, B, frames * TPF, cfg.num_heads, cfg.head_dim)
    assert nk.shape == nv.shape == shape
    # a [S] validity mask (shared by the batch) is accepted too
    got1, _, _ = step(x, t, kv, ck, cv, valid[0], cos, sin, fps=FPS, causal_block_size=block, y=y)
    assert max_diff(got1, want) < TOL


def _write(cache: torch.Tensor, slots: int, slot: int, new: torch.Tensor) -> None:
    """cache[:, b, slot block] = new[:, b] for every sample, through skyrt._core.kv_write_block on the
    per-sample ring view [layers, slots, tokens_per_block, N, Dh] (shares memory with `cache`)."""
    core = pytest.importorskip("skyrt._core")
    cache_np, new_np = cache.detach().numpy(), new.detach().contiguous().numpy()
    for b in range(cache.shape[1]):
        view = cache_np[:, b].reshape(cache.shape[0], slots, -1, *cache.shape[3:])
        assert np.shares_memory(view, cache_np)
        core.kv_write_block(view, slot, new_np[:, b])


def rollout_cache(dit, step, x, ctx, n_blocks, block, slot_order, spare, start=0, zero_invalid_fill=None):
    """Commit blocks 0 .. n_blocks-2 at t=0, in order, each against the cache of the ones before, into the
    ring slots `slot_order`; `spare` extra slots stay invalid (garbage). Returns (step, K, V, valid, kv)."""
    cfg = dit.config
    tpb = block * TPF
    slots = n_blocks - 1 + spare
    ck, cv, valid_tok = empty_cache(cfg, slots, tpb)
    if zero_invalid_fill is not None:
        ck.fill_(zero_invalid_fill)
        cv.fill_(zero_invalid_fill)
    slot_valid = torch.zeros(slots, dtype=torch.bool)
    kv = dit.cross_attention_kv(ctx)
    for j in range(n_blocks - 1):
        frames = slice(j * block, (j + 1) * block)
        cos, sin = active_rope(dit, start + j * block, block, HT, WT)
        _, nk, nv = step(x[:, :, frames], torch.zeros(B, block), kv, ck, cv, token_valid(slot_valid, tpb),
                         cos, sin, fps=FPS, causal_block_size=block)
        _write(ck, slots, slot_order[j], nk)
        _write(cv, slots, slot_order[j], nv)
        slot_valid[slot_order[j]] = True
    return ck, cv, token_valid(slot_valid, tpb).expand(B, -1).clone(), kv


@torch.no_grad()
@pytest.mark.parametrize("block", [1, 2])
def test_cache_of_committed_blocks_equals_block_causal_forward(block):
    dit, step = make()
    n_blocks = 3
    frames = n_blocks * block
    x, t, ctx, _, _ = data(CFG, frames, seed=2)
    t[:, : (n_blocks - 1) * block] = 0  # earlier blocks are clean in the full forward
    want = dit(x, t, ctx, fps=FPS, causal_block_size=block)

    ck, cv, valid, kv = rollout_cache(dit, step, x, ctx, n_blocks, block, slot_order=[2, 0], spare=2)
    assert not valid[:, 1 * block * TPF: 2 * block * TPF].any()  # an unused slot between used ones
    last = slice((n_blocks - 1) * block, frames)
    cos, sin = active_rope(dit, (n_blocks - 1) * block, block, HT, WT)
    got, _, _ = step(x[:, :, last], t[:, last], kv, ck, cv, valid, cos, sin, fps=FPS, causal_block_size=block)
    err = max_diff(got, want[:, :, last])
    print(f"(b) block={block}: max diff {err:.2e} (max |v| {want.abs().max():.2f})")
    assert err < TOL

    # masking matters: the same step with the garbage slots marked valid is far off
    bad, _, _ = step(x[:, :, last], t[:, last], kv, ck, cv, torch.ones_like(valid), cos, sin, fps=FPS,
                     causal_block_size=block)
    assert max_diff(bad, want[:, :, last]) > 1e-2

    # two blocks in flight at once: the last two blocks active (block-causal among themselves), cache of the rest
    if n_blocks >= 3:
        ck2, cv2, valid2, _ = rollout_cache(dit, step, x, ctx, n_blocks - 1, block, slot_order=[1], spare=1)
        t2 = t.clone()
        t2[:, block:] = torch.rand(B, frames - block) * 1000
        want2 = dit(x, t2, ctx, fps=FPS, causal_block_size=block)
        act = slice(block, frames)
        cos2, sin2 = active_rope(dit, block, frames - block, HT, WT)
        got2, _, _ = step(x[:, :, act], t2[:, act], kv, ck2, cv2, valid2, cos2, sin2, fps=FPS,
                          causal_block_size=block)
        err2 = max_diff(got2, want2[:, :, act])
        print(f"(b') block={block}, two blocks in flight: max diff {err2:.2e}")
        assert err2 < TOL


@torch.no_grad()
def test_nan_garbage_needs_zero_invalid():
    dit, step = make()
    block, n_blocks = 1, 3
    x, t, ctx, _, _ = data(CFG, n_blocks, seed=3)
    t[:, :2] = 0
    want = dit(x, t, ctx, fps=FPS, causal_block_size=block)[:, :, 2:]
    safe = CachedStep(dit, zero_invalid=True)
    ck, cv, valid, kv = rollout_cache(dit, safe, x, ctx, n_blocks, block, slot_order=[0, 2], spare=1,
                                      zero_invalid_fill=float("nan"))
    cos, sin = active_rope(dit, 2, 1, HT, WT)
    got, _, _ = safe(x[:, :, 2:], t[:, 2:], kv, ck, cv, valid, cos, sin, fps=FPS, causal_block_size=block)
    err = max_diff(got, want)
    print(f"zero_invalid with NaN garbage: max diff {err:.2e}")
    assert err < TOL
    plain, _, _ = step(x[:, :, 2:], t[:, 2:], kv, ck, cv, valid, cos, sin, fps=FPS, causal_block_size=block)
    assert torch.isnan(plain).any()  # documented: without zero_invalid invalid slots must be finite


@torch.no_grad()
@pytest.mark.parametrize("block,shift", [(1, 5), (2, 7)])
def test_rope_rebase_keeps_velocity(block, shift):
    core = pytest.importorskip("skyrt._core")
    dit, step = make()
    n_blocks, start = 3, 9
    frames = n_blocks * block
    x, t, ctx, _, _ = data(CFG, frames, seed=4)
    ck, cv, valid, kv = rollout_cache(dit, step, x, ctx, n_blocks, block, slot_order=[1, 0], spare=1, start=start)
    last = slice((n_blocks - 1) * block, frames)
    pos = start + (n_blocks - 1) * block
    cos, sin = active_rope(dit, pos, block, HT, WT)
    before, nk_before, nv_before = step(x[:, :, last], t[:, last], kv, ck, cv, valid, cos, sin, fps=FPS,
                                        causal_block_size=block)
    # and the cache itself is right at the shifted start: same as the full forward with frame_offset
    t_full = t.clone()
    t_full[:, : (n_blocks - 1) * block] = 0
    want = dit(x, t_full, ctx, fps=FPS, causal_block_size=block, frame_offset=start)[:, :, last]
    assert max_diff(before, want) < TOL

    ck_np = ck.numpy()  # [layers, B, S, N, Dh]: core treats B as slots and S as tokens; in place
    core.kv_rope_rebase(ck_np, shift)
    cos, sin = active_rope(dit, pos - shift, block, HT, WT)
    after, nk_after, nv_after = step(x[:, :, last], t[:, last], kv, ck, cv, valid, cos, sin, fps=FPS,
                                     causal_block_size=block)
    err = max_diff(after, before)
    # the active block's new keys come out already at the rebased positions
    nk_np = nk_before.numpy().copy()
    core.kv_rope_rebase(nk_np, shift)
    err_k = max_diff(nk_after, torch.from_numpy(nk_np))
    err_v = max_diff(nv_after, nv_before)  # layer 0's V is bit-equal; deeper ones see float rounding only
    print(f"(c) block={block} shift={shift}: velocity max diff {err:.2e}, new keys {err_k:.2e}, new values {err_v:.2e}")
    assert err < TOL and err_k < TOL and err_v < TOL
    assert torch.equal(nv_after[0], nv_before[0])


@torch.no_grad()
@pytest.mark.parametrize("cfg", [CFG, I2V], ids=["t2v", "i2v"])
def test_collapsed_padding_equals_attending_every_padding_token(cfg):
    """Collapsing the context's trailing identical rows to one key with a log(count) bias is exact:
    the whole DiT forward with collapsed cross K/V == the one that attends to all 512 rows."""
    from skyrt.export.dit import collapse_padding_rows

    dit, step = make(cfg)
    frames = 2
    x, t, _, y, clip = data(cfg, frames)
    real = 7
    ctx = torch.zeros(1, 512, cfg.text_dim)
    ctx[:, :real] = torch.randn(1, real, cfg.text_dim, generator=torch.Generator().manual_seed(3))
    short, bias = collapse_padding_rows(ctx)
    assert short.shape[1] == real + 1 and bias[-1].item() == pytest.approx(np.log(512 - real)) and bias[:-1].eq(0).all()
    full_kv = dit.cross_attention_kv(ctx, clip[:1] if clip is not None else None)
    short_kv = dit.cross_attention_kv(ctx, clip[:1] if clip is not None else None, collapse_padding=True)
    assert short_kv[0].k.shape[1] == real + 1
    ck, cv, valid = empty_cache(cfg, slots=2, tokens_per_slot=TPF)
    cos, sin = active_rope(dit, 0, frames, HT, WT)
    args = dict(fps=FPS[:1] if FPS is not None else None, causal_block_size=1, y=None if y is None else y[:1])
    want, wk, _ = step(x[:1], t[:1], full_kv, ck[:, :1], cv[:, :1], valid[:1], cos, sin, **args)
    got, gk, _ = step(x[:1], t[:1], short_kv, ck[:, :1], cv[:, :1], valid[:1], cos, sin, **args)
    assert max_diff(got, want) < 1e-5 and max_diff(gk, wk) < 1e-5
    # Dropping the bias (attending to one padding row as if it were one token) is visibly wrong.
    no_bias = [kv._replace(bias=torch.zeros_like(kv.bias)) for kv in short_kv]
    wrong, _, _ = step(x[:1], t[:1], no_bias, ck[:, :1], cv[:, :1], valid[:1], cos, sin, **args)
    assert max_diff(wrong, want) > 1e-3


def test_collapse_leaves_contexts_without_repeated_tail_alone():
    from skyrt.export.dit import collapse_padding_rows

    ctx = torch.randn(1, 16, 8)
    assert collapse_padding_rows(ctx)[1] is None
    assert collapse_padding_rows(torch.zeros(2, 16, 8))[1] is None  # batches keep the static layout
