"""Tests of the ring KV cache core (csrc/kv_cache.{h,cpp}): KVRing bookkeeping, kv_write_block and the
RoPE rebase, CPU references only.

Oracles written here: a plain Python list model of sink + window eviction, and the official 3D RoPE
(rope_params / rope_apply: complex pairs, head_dim split temporal d-4*(d//6), height and width
2*(d//6)) built with numpy complex128 and torch.polar. Rebasing keys rotated at temporal position p
by `shift` must equal keys rotated directly at p - shift.
Run: pytest tests/test_core_kv_cache.py
"""
from __future__ import annotations

import numpy as np
import pytest

core = pytest.importorskip("skyrt._core")

THETA = 10000.0


# ---- oracles ---------------------------------------------------------------------------------------


class ListModel:
    """Sinks keep the first blocks; the window is a list, oldest first; full -> drop the oldest."""

    def __init__(self, sink, window):
        self.sink, self.window, self.sinks, self.recent = sink, window, [], []

    def append(self, block):
        if len(self.sinks) < self.sink:
            self.sinks.append(block)
            return -1
        evicted = self.recent.pop(0) if len(self.recent) == self.window else -1
        self.recent.append(block)
        return evicted

    def blocks(self):
        return self.sinks + self.recent


def rope_split(head_dim):
    """Pairs per part as the official rope_apply: c = d/2 -> [c - 2*(c//3), c//3, c//3]."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_freqs_f32(dim):
    """Official rope_params frequencies, float32: 1 / theta^(arange(0, dim, 2) / dim). torch's float32 pow is
    correctly rounded here (numpy's float32 pow is not, by 1 ulp), so round the float64 power once."""
    exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    power = np.power(THETA, exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def rope3d_numpy(x, f_pos, h_pos, w_pos):
    """x: [..., tokens, heads, head_dim] float64; positions: [tokens]. Complex128 rotation, float32 freqs."""
    d = x.shape[-1]
    parts = rope_split(d)
    dims = [2 * p for p in parts]
    freqs = np.concatenate([np.outer(pos, rope_freqs_f32(dim).astype(np.float64))
                            for pos, dim in zip((f_pos, h_pos, w_pos), dims)], axis=1)  # [tokens, d/2]
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * freqs)[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def rope3d_torch(x, f_pos, h_pos, w_pos):
    """The official complex64 path: torch.polar tables of 1024 positions, view_as_complex, multiply."""
    torch = pytest.importorskip("torch")
    d = x.shape[-1]
    dims = [2 * p for p in rope_split(d)]

    def params(dim):
        inv = 1.0 / torch.pow(THETA, torch.arange(0, dim, 2).to(torch.float32).div(dim))
        freqs = torch.outer(torch.arange(1024), inv)
        return torch.polar(torch.ones_like(freqs), freqs)

    tables = [params(dim) for dim in dims]
    fr = torch.cat([tables[0][torch.from_numpy(f_pos)], tables[1][torch.from_numpy(h_pos)],
                    tables[2][torch.from_numpy(w_pos)]], dim=1)  # [tokens, d/2]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    z = torch.view_as_complex(xt.reshape(*xt.shape[:-1], -1, 2)) * fr[:, None, :]
    return torch.view_as_real(z).flatten(-2).numpy()


def grid(frames, height, width, first_frame):
    f, h, w = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    return (f.ravel() + first_frame).astype(np.int64), h.ravel().astype(np.int64), w.ravel().astype(np.int64)


# ---- bookkeeping -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sink,window", [(0, 1), (0, 5), (1, 3), (2, 4), (3, 1)])
def test_append_evict_matches_list_model(sink, window):
    rng = np.random.default_rng(sink * 10 + window)
    ring, model = core.KVRing(sink, window, frames_per_block=3), ListModel(sink, window)
    layers, tokens, heads, dim = 2, 5, 3, 4
    cache = np.full((layers, ring.capacity, tokens, heads, dim), np.nan, dtype=np.float32)
    data = {}
    block = -1
    for _ in range(40):
        block += int(rng.integers(1, 3))  # increasing ids with gaps
        a = ring.append(block)
        assert a.evicted_block == model.append(block)
        assert a.position == block * 3 and ring.position_of(block) == block * 3
        data[block] = rng.standard_normal((layers, tokens, heads, dim)).astype(np.float32)
        core.kv_write_block(cache, a.slot, data[block])
        held = model.blocks()
        assert ring.size == len(held) == int(ring.valid.sum())
        assert sorted(ring.slot_block[ring.valid].tolist()) == sorted(held)
        assert ring.slot_block[ring.slots_in_order()].tolist() == held
        assert (ring.slot_block[~ring.valid] == -1).all()
        for slot, b in enumerate(ring.slot_block.tolist()):
            if b >= 0:
                np.testing.assert_array_equal(cache[:, slot], data[b])
    assert ring.appended == 40
    with pytest.raises(ValueError):
        ring.append(block)  # not increasing
    ring.reset()
    assert ring.size == 0 and ring.appended == 0 and ring.origin == 0


def test_rebase_bookkeeping_keeps_positions_in_table_forever():
    fpb, window, sink = 2, 6, 1
    ring = core.KVRing(sink, window, fpb)
    table, in_flight = 1024, 4  # blocks being denoised beyond the cache need positions too
    for block in range(5000):
        if ring.position_of(block + in_flight) + fpb > table:
            oldest = ring.slots_in_order()[sink]  # first window slot
            ring.rebase(int(ring.slot_position[oldest]))
        a = ring.append(block)
        assert 0 <= a.position and a.position + fpb * (in_flight + 1) <= table
        valid = ring.valid
        np.testing.assert_array_equal(ring.slot_position[valid], ring.slot_block[valid] * fpb - ring.origin)
    assert ring.origin > 5000 * fpb - table


def test_invalid_arguments():
    with pytest.raises(ValueError):
        core.KVRing(0, 0)
    with pytest.raises(ValueError):
        core.KVRing(-1, 2)
    cache = np.zeros((2, 3, 4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="slot"):
        core.kv_write_block(cache, 3, np.zeros((2, 4, 2, 8), np.float32))
    with pytest.raises(ValueError, match="float32 or both float16"):
        core.kv_write_block(cache, 0, np.zeros((2, 4, 2, 8), np.float16))
    with pytest.raises(ValueError, match="differ"):
        core.kv_write_block(cache, 0, np.zeros((2, 4, 2, 6), np.float32))
    with pytest.raises(ValueError, match="head_dim"):
        core.kv_rope_rebase(np.zeros((1, 1, 1, 1, 8), np.float32)[..., ::2], 3)
    with pytest.raises(RuntimeError):
        core.kv_rope_rebase(np.zeros((1, 1, 1, 1, 7), np.float32), 3)  # odd head_dim


# ---- RoPE rebase -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [12, 64, 96, 128])
@pytest.mark.parametrize("shift", [1, 37, 512, -5])
def test_rebase_equals_rotation_at_shifted_position(head_dim, shift):
    """Keys rotated (3D RoPE) at temporal position p and rebased by shift == keys rotated at p - shift."""
    rng = np.random.default_rng(head_dim + shift)
    layers, slots, heads, fpb, hh, ww = 2, 3, 3, 2, 3, 5
    tokens = fpb * hh * ww
    raw = rng.standard_normal((layers, slots, tokens, heads, head_dim))
    slot_pos = np.array([600, 700, 1000 - fpb])  # first frame of each slot's block
    keys64 = np.empty_like(raw)
    want = np.empty_like(raw)
    for s, p in enumerate(slot_pos):
        f, h, w = grid(fpb, hh, ww, p)
        keys64[:, s] = rope3d_numpy(raw[:, s], f, h, w)
        want[:, s] = rope3d_numpy(raw[:, s], f - shift, h, w)
    keys = keys64.astype(np.float32)
    core.kv_rope_rebase(keys, shift)
    err = np.abs(keys - want).max()
    assert err < 1e-6 * np.abs(want).max(), err  # measured ~1e-7 relative (float32 rounding)
    # only the temporal part moved: height/width pairs are bit-identical
    d_t = core.rope_temporal_dim(head_dim)
    assert d_t == 2 * rope_split(head_dim)[0]
    np.testing.assert_array_equal(keys[..., d_t:], keys64.astype(np.float32)[..., d_t:])


def test_rebase_matches_official_complex64_tables():
    """Same property against the official torch.polar complex64 tables (positions within 1024)."""
    rng = np.random.default_rng(7)
    head_dim, heads, fpb, hh, ww = 128, 2, 3, 2, 2
    raw = rng.standard_normal((1, 1, fpb * hh * ww, heads, head_dim))
    f, h, w = grid(fpb, hh, ww, 900)
    keys = rope3d_torch(raw[:, 0], f, h, w)[:, None].copy()
    core.kv_rope_rebase(keys, 850)
    want = rope3d_torch(raw[:, 0], f - 850, h, w)[:, None]
    err = np.abs(keys - want).max()
    # measured 6e-5: inherited from the input keys, whose complex64 angles at p ~ 900 carry float32
    # rounding of p * freq (the rebase itself adds ~1e-7, see the float64 test above)
    assert err < 2e-4, err


def test_rebases_compose_and_strided_views_touch_only_their_slots():
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((2, 5, 4, 2, 64)).astype(np.float32)
    one = keys.copy()
    core.kv_rope_rebase(one, 300)
    two = keys.copy()
    core.kv_rope_rebase(two, 100)
    core.kv_rope_rebase(two, 200)
    assert np.abs(one - two).max() < 1e-5
    view = keys.copy()
    core.kv_rope_rebase(view[:, 1:4], 300)  # non-contiguous slots: strides are honoured
    np.testing.assert_array_equal(view[:, [0, 4]], keys[:, [0, 4]])
    np.testing.assert_allclose(view[:, 1:4], one[:, 1:4], rtol=0, atol=1e-6)


def test_float16_conversions_exact_for_every_finite_half():
    bits = np.arange(1 << 16, dtype=np.uint16)
    halves = bits.view(np.float16)
    halves = halves[np.isfinite(halves)]
    pad = (-halves.size) % 64
    keys = np.concatenate([halves, np.zeros(pad, np.float16)]).reshape(1, 1, -1, 1, 64)
    out = keys.copy()
    core.kv_rope_rebase(out, 0)  # identity rotation: load half -> float -> store half
    np.testing.assert_array_equal(out.astype(np.float32), keys.astype(np.float32))


@pytest.mark.parametrize("shift", [3, 250])
def test_rebase_float16(shift):
    rng = np.random.default_rng(shift)
    head_dim = 128
    raw = rng.standard_normal((2, 2, 6, 4, head_dim))
    f, h, w = grid(1, 2, 3, 500)
    keys64 = np.stack([rope3d_numpy(raw[:, s], f, h, w) for s in range(2)], axis=1)
    want = np.stack([rope3d_numpy(raw[:, s], f - shift, h, w) for s in range(2)], axis=1)
    keys = keys64.astype(np.float16)
    core.kv_rope_rebase(keys, shift)
    assert keys.dtype == np.float16
    err = np.abs(keys.astype(np.float64) - want).max()
    assert err < 1e-3 * np.abs(want).max(), err  # two fp16 roundings (input and output), measured ~5e-4
    # rounding of the float result to half is round-to-nearest-even, as numpy
    k32 = keys64.astype(np.float16).astype(np.float32)
    core.kv_rope_rebase(k32, shift)
    np.testing.assert_array_equal(keys, k32.astype(np.float16))


def test_write_block_float16_and_layer_strides():
    rng = np.random.default_rng(11)
    cache = np.zeros((3, 4, 2, 2, 16), np.float16)
    src = rng.standard_normal((3, 2, 2, 16)).astype(np.float16)
    core.kv_write_block(cache, 2, src)
    np.testing.assert_array_equal(cache[:, 2], src)
    assert not cache[:, [0, 1, 3]].any()
    # a layer-strided source (every other layer of a bigger array) is fine; the block itself is contiguous
    big = rng.standard_normal((6, 2, 2, 16)).astype(np.float16)
    core.kv_write_block(cache, 1, big[::2])
    np.testing.assert_array_equal(cache[:, 1], big[::2])


def test_cuda_entry_points_exist():
    names = ["cfg_combine", "kv_write_block", "kv_rope_rebase", "flow_euler", "flow_unipc", "addnoise_condition"]
    assert all(hasattr(core.cuda, n) for n in names)
    if not core.cuda.available():
        with pytest.raises(RuntimeError, match="no CUDA kernels"):
            core.cuda.kv_rope_rebase(0, 1, 1, 1, 1, 8, 8, 8, 8, 8, 1)


def test_oracle_frequencies_are_the_official_torch_table():
    torch = pytest.importorskip("torch")
    for dim in (4, 16, 24, 32, 44, 64, 88):
        official = (1.0 / torch.pow(THETA, torch.arange(0, dim, 2).to(torch.float32).div(dim))).numpy()
        np.testing.assert_array_equal(rope_freqs_f32(dim), official)
