"""The rollout core (skyrt._core.RolloutCore driven by runtime/kvcache.py) against the all-numpy
rollout it replaced (tests/kvcache_numpy_reference.py, frozen), same model, noise and rng: every
exactness case of the kvcache mode must agree to 1e-5. Both drive the same torch DiT step; what
differs is everything the core took over: the DF row loop, per-frame UniPC (with the official DF
aliasing) and Euler, CFG combine, addnoise, ring commits, eviction, RoPE rebase, recache.

Also: the core's buffers are allocated once per stream and released by close(); a closed core
refuses calls; the UniPC kernel with official_df_aliasing equals diffusers' UniPC driven the way the
official DF loop drives it (sample passed as a view of the latents and written back into it).

Run: python -m pytest tests/test_kvcache_core.py -q
"""
from __future__ import annotations

import math
import warnings

import kvcache_numpy_reference as numpy_ref
import numpy as np
import pytest

from skyrt import _core
from skyrt.runtime import kvcache

TOL = 1e-5
H = W = 32
RED, BLUE = "a red circle " * 120, "a blue square " * 120  # long prompts move a random model (test_kvcache_reference)


def _request(pipe, **overrides):
    kwargs = dict(prompt="a red circle", num_frames=1 + 4 * 2**40, height=H, width=W, num_inference_steps=4, shift=8.0,
                  guidance_scale=1.0, ar_step=1, causal_block_size=1, mode="kvcache", causal_attention=True,
                  sink_blocks=1, window_blocks=8)
    kwargs.update(overrides)
    return pipe._request(kwargs)


def _run(cls, pipe, req, n_blocks, horizon=None, prefix=None, noise_frames=None, switch=None):
    """The first n_blocks clean blocks of a rollout of class `cls`; switch = (after, prompt, recache)."""
    cond = pipe._condition(req, None, None, None)  # fresh rng from req.seed: both classes draw alike
    noise = None
    if noise_frames:
        noise = np.random.default_rng(9).standard_normal((16, noise_frames, H // 8, W // 8), dtype=np.float32)
    settings = kvcache.KVSettings(req.sink_blocks, req.window_blocks)
    rollout = cls(pipe.backend, req, cond.cond, cond.uncond, cond.rng, settings, horizon, prefix=prefix, noise=noise)
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for blk in rollout.blocks():
            got.append(np.array(blk))
            if switch is not None and len(got) == switch[0]:
                uncond = pipe.backend.encode_text("grainy") if req.use_cfg else None
                rollout.set_prompt(pipe.backend.encode_text(switch[1]), uncond, recache=switch[2])
            if len(got) == n_blocks:
                break
    if hasattr(rollout, "close"):
        rollout.close()
    return np.concatenate(got, axis=1)


def _compare(pipe, monkeypatch=None, rope_table=None, **kwargs):
    if rope_table is not None:
        monkeypatch.setattr(kvcache, "ROPE_TABLE", rope_table)
        monkeypatch.setattr(numpy_ref, "ROPE_TABLE", rope_table)
    got = _run(kvcache.KVRollout, pipe, **kwargs)
    want = _run(numpy_ref.KVRollout, pipe, **kwargs)
    diff = float(np.abs(got - want).max())
    print(f"max |core - numpy rollout| = {diff:.3g}")
    assert got.shape == want.shape and np.isfinite(got).all()
    assert diff <= TOL
    return got


CASES = {  # name: (request overrides, blocks, horizon)
    "sync_blocks_of_1": (dict(ar_step=0), 3, 3),
    "async_blocks_of_1_cfg": (dict(ar_step=1, guidance_scale=5.0), 3, 3),
    "blocks_of_2": (dict(ar_step=2, causal_block_size=2), 3, 3),
    "one_block_of_5": (dict(ar_step=0, causal_block_size=5, guidance_scale=5.0), 1, 1),
    "async_blocks_of_5": (dict(ar_step=1, causal_block_size=5), 2, 2),
    "euler": (dict(ar_step=1, sampler="euler", guidance_scale=5.0), 3, 3),
    "evicting_ring": (dict(ar_step=2, sink_blocks=1, window_blocks=2, guidance_scale=5.0), 8, None),
    "no_sink": (dict(ar_step=2, sink_blocks=0, window_blocks=3), 7, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_core_rollout_equals_numpy_rollout(official_pipeline, name):
    overrides, blocks, horizon = CASES[name]
    req = _request(official_pipeline, seed=11, **overrides)
    _compare(official_pipeline, req=req, n_blocks=blocks, horizon=horizon,
             noise_frames=blocks * req.causal_block_size if horizon else None)


@pytest.mark.parametrize("addnoise", [0, 20])
def test_core_rollout_with_image_prefix(official_pipeline, addnoise):
    pipe = official_pipeline
    req = _request(pipe, seed=5, ar_step=1, guidance_scale=5.0, addnoise_condition=addnoise, condition_noise="once")
    image = np.random.default_rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8)
    prefix = pipe._encode_image(image, req)  # [16, 1, 4, 4]: one committed block
    _compare(pipe, req=req, n_blocks=4, horizon=4, prefix=prefix)


def test_core_rollout_with_video_prefix(official_pipeline):
    pipe = official_pipeline
    req = _request(pipe, seed=4, ar_step=1, guidance_scale=1.0)
    video = np.random.default_rng(8).integers(0, 256, (5, H, W, 3), dtype=np.uint8)
    from skyrt.runtime.video_io import to_model_pixels

    prefix = pipe._encode_pixels(to_model_pixels(video))  # 5 frames -> 2 latent frames: two committed blocks
    _compare(pipe, req=req, n_blocks=5, horizon=5, prefix=prefix)


@pytest.mark.parametrize("block,ar_step", [(1, 1), (2, 2)])
def test_core_rollout_rebases_past_the_rope_table(official_pipeline, monkeypatch, block, ar_step):
    # A 12-position table so a short stream crosses it several times (the real one has 1024); the
    # rebases are counted so the comparison cannot pass without them.
    shifts = []
    real = kvcache.KVCache.rebase
    monkeypatch.setattr(kvcache.KVCache, "rebase", lambda self, s: (shifts.append(s), real(self, s))[1])
    req = _request(official_pipeline, seed=3, ar_step=ar_step, causal_block_size=block, sink_blocks=1,
                   window_blocks=2, guidance_scale=5.0)
    _compare(official_pipeline, monkeypatch, rope_table=12, req=req, n_blocks=28 // block)
    assert len(shifts) >= 3


@pytest.mark.parametrize("recache", [False, True])
def test_core_rollout_prompt_switch(official_pipeline, recache):
    import test_kvcache_reference as ref_tests

    pipe = ref_tests.prompt_sensitive(official_pipeline)
    req = _request(pipe, prompt=RED, negative_prompt="blurry", seed=6, ar_step=2, sink_blocks=1, window_blocks=2,
                   guidance_scale=5.0)
    got = _compare(pipe, req=req, n_blocks=9, switch=(4, BLUE, recache))
    plain = _run(kvcache.KVRollout, pipe, req=req, n_blocks=9)
    assert np.abs(got - plain).max() > 1e-2  # the switch is visible: the comparison covers it


def test_core_buffers_are_allocated_once_and_released(official_pipeline):
    before = _core.memory_stats()
    req = _request(official_pipeline, seed=1, ar_step=1, sink_blocks=1, window_blocks=2, guidance_scale=5.0)
    cond = official_pipeline._condition(req, None, None, None)
    rollout = kvcache.KVRollout(official_pipeline.backend, req, cond.cond, cond.uncond, cond.rng,
                                kvcache.KVSettings(1, 2))
    blocks = rollout.blocks()
    next(blocks)
    warm = _core.memory_stats()
    for _ in range(10):  # 10 blocks = 40 rows, with evictions and a prompt switch
        next(blocks)
    rollout.set_prompt(cond.cond, cond.uncond, recache=True)
    next(blocks)
    assert _core.memory_stats()["allocations"] == warm["allocations"]
    core = rollout.core
    rollout.close()
    after = _core.memory_stats()
    assert after["live"] == before["live"] and after["live_bytes"] == before["live_bytes"]
    with pytest.raises(RuntimeError, match="closed"):
        core.next_row()
    rollout.close()  # idempotent


def test_core_refuses_bad_settings_and_inputs():
    kwargs = dict(height=2, width=2, tokens_per_frame=1, layers=1, heads=1, head_dim=8)
    with pytest.raises(ValueError, match="sigmas must hold"):
        _core.RolloutCore([999, 500], [0.9, 0.0], **kwargs)
    with pytest.raises(ValueError, match="sampler 'ddim'"):
        _core.RolloutCore([999], [0.9, 0.0], sampler="ddim", **kwargs)
    with pytest.raises(ValueError, match="first two timesteps are equal"):
        _core.RolloutCore([999, 999, 3], [0.9, 0.8, 0.1, 0.0], **kwargs)
    core = _core.RolloutCore([999, 500], [0.9, 0.5, 0.0], max_blocks_in_flight=1, ar_step=2, **kwargs)
    plan = core.next_row()
    assert plan.started == [0]
    with pytest.raises(ValueError, match=r"noise must be float32 \[16, 1, 2, 2\] \(64 elements\), got 3"):
        core.start_block(0, np.zeros(3, np.float32))
    with pytest.raises(RuntimeError, match="start_block\\(1\\)"):
        core.start_block(1, np.zeros((16, 1, 2, 2), np.float32))
    with pytest.raises(IndexError, match="at most 1"):
        core.buffer("velocity", 2)


def test_unipc_kernel_official_aliasing_equals_diffusers_driven_like_the_df_loop():
    """The official DF loop passes latents[:, f] (a view) as `sample` and writes the result into it:
    diffusers' UniPC keeps that view as its last sample, so its first kept sample is the output. Driving
    diffusers that way is the oracle for flow_unipc(official_df_aliasing=True)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from skyrt.runtime.scheduler import flow_sigmas

    steps, frames = 6, 3
    sig = flow_sigmas(steps, 5.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, frames, 5)).astype(np.float32)
    hist = [np.zeros_like(x) for _ in range(3)]
    latents = torch.from_numpy(x.copy())  # the DF loop's buffer
    scheds = []
    for _ in range(frames):
        s = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0,
                                              solver_order=2)
        s.set_timesteps(sigmas=sig[:-1].astype(np.float64))
        scheds.append(s)
    plain = x.copy()
    plain_hist = [np.zeros_like(x) for _ in range(3)]
    for k in range(steps):
        v = (0.7 * x - 0.2).astype(np.float32)
        for f in range(frames):
            view = latents[:, f]
            out = scheds[f].step(torch.from_numpy(v[:, f].copy()), scheds[f].timesteps[k], view, return_dict=False)[0]
            view.copy_(out)  # official: latents[:, idx] = step(..., latents[:, idx])
        coeffs = _core.unipc_frame_coeffs(sig.astype(np.float64), np.full(frames, k))
        _core.flow_unipc(x, v, x, *hist, coeffs, official_df_aliasing=True)
        _core.flow_unipc(plain, (0.7 * plain - 0.2).astype(np.float32), plain, *plain_hist, coeffs)
    diff = float(np.abs(x - latents.numpy()).max())
    print(f"aliased kernel vs diffusers driven like the DF loop: {diff:.3g}; vs plain: {np.abs(x - plain).max():.3g}")
    assert diff <= 1e-5
    assert np.abs(x - plain).max() > 1e-3  # the flag matters: the comparison can fail


@pytest.mark.parametrize("sink, window", [(1, 2), (0, 3), (2, 1)])
def test_longlive_recache_chunk_is_their_rule(sink, window):
    """pack_recache / write_recache against LongLive's _recache_after_switch rule written here: before
    block j, with L = sink + window + 1, the chunk is blocks 0..j-1 (j <= L, attending to nothing else)
    or j-window-1..j-1 (j > L, attending to the sink as it is); its inputs are the committed ones (the
    oldest may already have left the ring); the new K/V of the chunk's blocks still in the ring go back
    to their slots, nothing else changes."""
    C, b, h, w, tpf, hd = 16, 2, 2, 2, 1, 8
    core = _core.RolloutCore([999], [0.5, 0.0], sampler="euler", longlive_recache=True, ar_step=1, causal_block_size=b,
                             sink_blocks=sink, window_blocks=window, height=h, width=w, tokens_per_frame=tpf,
                             layers=1, heads=1, head_dim=hd)
    L = sink + window + 1
    assert core.max_frames == L * b  # the chunk's step fits the core's buffers
    inputs = {}
    for j in range(12):
        plan = core.pack_recache()
        expected = list(range(j)) if j <= L else list(range(j - window - 1, j))
        assert plan.blocks == expected and plan.frames == len(expected) * b
        valid = np.zeros(core.capacity, bool)
        if j > L:
            valid[:sink] = True
        assert np.array_equal(plan.slot_valid, valid)
        if expected:
            assert plan.position == core.position_of(expected[0])
            packed = core.buffer("latents_in", plan.frames).numpy()[0]
            assert np.array_equal(packed, np.concatenate([inputs[blk] for blk in expected], axis=1))
            before = core.buffer("cache_k").numpy().copy()
            new_k = core.buffer("new_k", plan.frames).numpy()  # [layers, B, F * tpf, heads, hd]
            for i, blk in enumerate(expected):
                new_k[:, :, i * b * tpf : (i + 1) * b * tpf] = 1000 + blk
            core.write_recache()
            cache = core.buffer("cache_k").numpy().reshape(1, 1, core.capacity, b * tpf, 1, hd)
            for slot, blk in enumerate(core.slot_block):
                was = before.reshape(cache.shape)[:, :, slot]
                assert np.all(cache[:, :, slot] == (1000 + blk if blk in expected else was))
        # commit block j from a known input, its K/V marked with its id
        inputs[j] = np.random.default_rng(j).standard_normal((C, b, h, w), dtype=np.float32)
        core.load_commit_input(inputs[j])
        core.pack_store(core.next_slot())
        core.buffer("new_k", b).numpy()[:] = j
        core.commit(j, 0.0)
