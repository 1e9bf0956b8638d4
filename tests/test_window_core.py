"""Window mode on the rollout core (skyrt._core.RolloutCore.window) against the frozen host engine
it replaced (tests/window_numpy_reference.py: numpy UniPC / Euler per frame, predict_velocity per
context (tests/step_reference.py), the DF matrix of the window). Same seed, same noise draws, whole
generate() / stream() calls, so the window bookkeeping (carry, V2V, end image, streams) runs around both engines.

Two DiTs: the tiny random checkpoint (the core's path runs the torch backend's stream session step
with no cache, the host's its full forward) and an analytic velocity shared by both engines (so only
the engine differs: schedule, samplers, CFG, addnoise and noise order).
Run: python -m pytest tests/test_window_core.py -q
"""
from __future__ import annotations

import numpy as np
import pytest

from skyrt import _core
import step_reference
from step_reference import VelocityWindowSession
from window_numpy_reference import host_engine

SMALL = dict(height=32, width=32, num_inference_steps=4, shift=8.0, guidance_scale=5.0, seed=11)
TOL = 1e-5  # fp32: the samplers' scalar coefficients are rounded in different places (host vs core)


def _image(seed):
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _video(seed):
    return np.random.default_rng(seed).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)


SETTINGS = {
    "sync-unipc-cfg": dict(num_frames=9, ar_step=0),
    "async-euler-no-cfg": dict(num_frames=17, ar_step=1, sampler="euler", guidance_scale=1.0),
    "block2-causal-async": dict(num_frames=13, ar_step=1, causal_block_size=2, causal_attention=True),
    "block2-full-sync": dict(num_frames=13, ar_step=0, causal_block_size=2, causal_attention=False),
    "latent-carry-addnoise-step": dict(num_frames=17, base_num_frames=9, overlap_history=5, overlap_carry="latent",
                                       addnoise_condition=20, condition_noise="step"),
    "pixel-carry-addnoise-once-euler": dict(num_frames=17, base_num_frames=9, overlap_history=5, ar_step=1,
                                            overlap_carry="pixel", addnoise_condition=20, condition_noise="once",
                                            sampler="euler"),
    "i2v-end-image-async": dict(num_frames=9, ar_step=1, image=_image(0), end_image=_image(1)),
    "v2v-latent-carry-addnoise": dict(video=_video(2), num_frames=13, base_num_frames=9, overlap_history=5,
                                      overlap_carry="latent", addnoise_condition=20),
}


def generate_both(pipe, **kwargs):
    core = pipe.generate("a red circle", negative_prompt="blurry", output="latent", progress=False, **kwargs)
    with host_engine(pipe):
        host = pipe.generate("a red circle", negative_prompt="blurry", output="latent", progress=False, **kwargs)
    return core, host


@pytest.mark.parametrize("name", SETTINGS)
def test_core_window_equals_host_engine(official_pipeline, name):
    core, host = generate_both(official_pipeline, **{**SMALL, **SETTINGS[name]})
    assert core.shape == host.shape
    print(f"{name}: max |core - host| = {np.abs(core - host).max():.3g}")
    assert np.abs(core - host).max() <= TOL


def analytic_velocity(latents, timesteps, context, fps_class, causal_block_size):
    """A cheap nonlinear stand-in for the DiT: depends on every frame (as full attention does, or on
    earlier blocks only with a block size), on each frame's timestep and on the prompt."""
    x = np.asarray(latents, np.float64)  # [16, F, h, w]
    t = np.asarray(timesteps, np.float64)[None, :, None, None] / 1000.0
    bias = float(np.asarray(context.value, np.float64).mean()) * 50.0
    mean = x.mean(axis=(0, 2, 3), keepdims=True)  # [1, F, 1, 1]
    if causal_block_size is None:
        mix = np.broadcast_to(mean.mean(axis=1, keepdims=True), mean.shape)
    else:  # the running mean over blocks up to and including each frame's own
        blocks = mean.reshape(1, -1, causal_block_size, 1, 1).mean(axis=2)
        mix = np.repeat(np.cumsum(blocks, axis=1) / np.arange(1, blocks.shape[1] + 1)[None, :, None, None],
                        causal_block_size, axis=1)
    return (np.tanh(x) * (1.0 + t) - 0.3 * x + mix + bias * t).astype(np.float32)


@pytest.fixture
def analytic_pipeline(official_pipeline, monkeypatch):
    backend = official_pipeline.backend
    monkeypatch.setattr(step_reference, "predict_velocity", lambda _backend, *args: analytic_velocity(*args))
    monkeypatch.setattr(backend, "open_kv_stream", lambda spec: VelocityWindowSession(backend, spec, analytic_velocity))
    return official_pipeline


@pytest.mark.parametrize("name", SETTINGS)
def test_core_engine_equals_host_engine_on_one_velocity(analytic_pipeline, name):
    core, host = generate_both(analytic_pipeline, **{**SMALL, **SETTINGS[name]})
    print(f"{name}: max |core - host| = {np.abs(core - host).max():.3g}")
    assert np.abs(core - host).max() <= TOL


def test_stream_on_the_core_equals_the_host_stream(official_pipeline):
    kwargs = dict(SMALL, base_num_frames=9, overlap_history=5, addnoise_condition=20, output="latent")
    core = np.concatenate(list(official_pipeline.stream("x", max_chunks=3, **kwargs)), axis=1)
    with host_engine(official_pipeline):
        host = np.concatenate(list(official_pipeline.stream("x", max_chunks=3, **kwargs)), axis=1)
    assert core.shape == host.shape == (16, 5, 4, 4)
    assert np.abs(core - host).max() <= TOL


def test_window_core_row_protocol_and_timesteps():
    """Direct use of the core: the DiT sees every frame each row with the official matrix's timesteps
    (prefix at addnoise_condition, end block at 0, unstarted at 999), and the window's buffers hold no K/V."""
    template = [999, 937, 833, 624]
    sigmas = [0.999, 0.937, 0.833, 0.624, 0.0]
    core = _core.RolloutCore.window(template, sigmas, ar_step=1, causal_block_size=1, prefix_blocks=1, window_blocks=4,
                                    end_blocks=1, addnoise_condition=20.0, height=2, width=2, contexts=2)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((16, 4, 2, 2), dtype=np.float32)
    noise = rng.standard_normal((16, 1, 2, 2), dtype=np.float32)
    core.load_window(z)
    core.set_condition_noise(noise)
    matrix = _core.df_timestep_matrix(4, np.array(template), 4, 1, 1, 1)[0]
    rows = 0
    while core.next_row() is not None:
        assert core.pack_window() == 4
        expected = matrix[rows].astype(np.float32)
        expected[0], expected[-1] = 20.0, 0.0
        assert np.array_equal(core.window_timesteps, expected)
        x = core.buffer("latents_in").numpy()  # [2, 16, 4, 2, 2]: every context the same window
        assert np.array_equal(x[0], x[1])
        # addnoise_condition 20 on the prefix frame: x (1 - 0.02) + noise 0.02 (float32, as torch computes it)
        noised = z[:, :1] * np.float32(1 - 0.02) + noise * np.float32(0.02)
        assert np.allclose(x[0, :, :1], noised, rtol=0, atol=1e-7)
        if rows == 0:  # nothing stepped yet: the other frames are the window as loaded
            assert np.array_equal(x[0, :, 1:], z[:, 1:])
        assert np.array_equal(x[0, :, -1], z[:, -1])  # the pinned end block never moves
        assert core.buffer("new_k").shape[2] == core.buffer("cache_k").shape[2] == 0
        core.buffer("velocity").numpy()[:] = 0.0
        core.apply_velocity()
        rows += 1
    assert rows == len(matrix)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(window_blocks=0), r"window of at least one block \(window_blocks"),
    (dict(window_blocks=2, prefix_blocks=2, end_blocks=1), r"prefix_blocks \+ end_blocks \(3\)"),
    (dict(window_blocks=2, addnoise_condition=1000.0), r"addnoise_condition must be in \[0, 1000\)"),
])
def test_window_core_refuses_bad_windows(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        _core.RolloutCore.window([999, 937], [0.999, 0.937, 0.0], height=2, width=2, **kwargs)


def test_window_calls_need_a_window_core():
    core = _core.RolloutCore([999, 937], [0.999, 0.937, 0.0], horizon_blocks=1, height=2, width=2,
                             tokens_per_frame=1, layers=1, heads=1, head_dim=2)
    with pytest.raises(ValueError, match="window mode's"):
        core.load_window(np.zeros((16, 1, 2, 2), np.float32))
    with pytest.raises(RuntimeError, match="window mode's"):
        core.pack_window()
