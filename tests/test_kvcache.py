"""mode="kvcache" against the window mode with the block-causal mask and the same noise.

Within the cache's capacity the KV-cached rollout must reproduce the window mode exactly (fp32)
for block-causal attention: every finished block's K/V is what the window mode recomputes at t=0.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from skyrt.runtime import kvcache

SMALL = dict(height=32, width=32, num_inference_steps=4, shift=8.0, guidance_scale=5.0, progress=False)


@pytest.mark.parametrize("settings", [
    dict(num_frames=9, ar_step=0, causal_block_size=1),  # sync, 3 blocks in flight together
    dict(num_frames=9, ar_step=1, causal_block_size=1),  # async
    dict(num_frames=13, ar_step=2, causal_block_size=2),  # blocks of 2
    dict(num_frames=17, ar_step=0, causal_block_size=5),  # one block of 5
    dict(num_frames=13, ar_step=4, causal_block_size=1, guidance_scale=1.0),  # block after block, no CFG
    dict(num_frames=13, ar_step=0, causal_block_size=2),  # sync blocks of 2
    dict(num_frames=37, ar_step=1, causal_block_size=5),  # async blocks of 5
    dict(num_frames=9, ar_step=1, causal_block_size=1, image=True),  # I2V: the image is a committed block
    # addnoise_condition: the prefix is committed once at t = 20 with noise drawn once; the window
    # mode reference draws it once per window too (condition_noise="once", set for both below).
    dict(num_frames=9, ar_step=1, causal_block_size=1, image=True, addnoise_condition=20),
    dict(num_frames=13, ar_step=0, causal_block_size=1, image=True, addnoise_condition=20, guidance_scale=1.0),
])
def test_kvcache_equals_block_causal_window_mode(official_pipeline, settings):
    kwargs = {**SMALL, **settings}
    if kwargs.pop("image", False):
        kwargs["image"] = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    if kwargs.get("addnoise_condition"):
        kwargs["condition_noise"] = "once"
    window = official_pipeline.generate("a red circle", output="latent", seed=11, causal_attention=True, **kwargs)
    cached = official_pipeline.generate("a red circle", output="latent", seed=11, causal_attention=True,
                                        mode="kvcache", sink_blocks=1, window_blocks=8, **kwargs)
    print(f"max |kvcache - window| = {np.abs(cached - window).max():.3g} for {settings}")
    assert cached.shape == window.shape
    assert np.abs(cached - window).max() <= 1e-4


def test_kvcache_needs_no_windows_and_takes_whole_clip_noise(official_pipeline):
    # 25 frames > base_num_frames=9 without overlap: fine in kvcache mode (no windows), and the
    # initial noise covers the whole clip [16, 7, 4, 4].
    noise = np.random.default_rng(0).standard_normal((16, 7, 4, 4), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        z = official_pipeline.generate("x", num_frames=25, base_num_frames=9, ar_step=1, mode="kvcache",
                                       latents=noise, output="latent", seed=0, **SMALL)
    assert z.shape == (16, 7, 4, 4)


def test_bidirectional_checkpoint_warns(official_pipeline):
    with pytest.warns(UserWarning, match="approximates"):
        official_pipeline.generate("x", num_frames=5, mode="kvcache", output="latent", seed=0, **SMALL)


def test_endless_stream_rebases_past_the_rope_table(official_pipeline, monkeypatch):
    # Shrink the table so a short test crosses it several times; the real one is 1024 positions.
    monkeypatch.setattr(kvcache, "ROPE_TABLE", 12)
    rebases = []
    real = kvcache.KVCache.rebase
    monkeypatch.setattr(kvcache.KVCache, "rebase", lambda self, shift: (rebases.append(shift), real(self, shift)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        chunks = list(official_pipeline.stream("x", mode="kvcache", ar_step=4, causal_block_size=1, sink_blocks=1,
                                               window_blocks=2, max_chunks=40, seed=0, height=32, width=32,
                                               num_inference_steps=4, guidance_scale=1.0))
    frames = np.concatenate(chunks)
    assert frames.shape == (1 + 4 * 39, 32, 32, 3)
    assert len(rebases) >= 3 and all(s > 0 for s in rebases)


def test_kvcache_stream_ignores_the_window_overlap(official_pipeline):
    # stream()'s default overlap_history=17 is 5 latent frames, not a multiple of causal_block_size=2:
    # window mode must refuse it, but a kvcache stream has no windows to overlap and must just run.
    kwargs = dict(ar_step=2, causal_block_size=2, height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
                  max_chunks=2, seed=0)
    with pytest.raises(ValueError, match="not a multiple of causal_block_size=2"):
        next(official_pipeline.stream("x", mode="window", **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        chunks = list(official_pipeline.stream("x", mode="kvcache", **kwargs))
    assert [len(c) for c in chunks] == [5, 8]


@pytest.mark.parametrize("num_frames, whole_blocks_frames", [(1, 5), (9, 13), (10, 13), (12, 13), (14, 21)])
def test_kvcache_takes_any_frame_count_and_returns_exactly_those_frames(official_pipeline, num_frames,
                                                                        whole_blocks_frames):
    # Blocks of 2 latent frames: 1, 9, 10, 12 and 14 pixel frames need 1, 3, 4, 4 and 5 latents, so the
    # clip is denoised as whole blocks (2, 4, 4, 4, 6 latents: 5, 13, 13, 13, 21 frames) and cut. With
    # the same seed both draw the same noise, so the cut clip must be the start of the whole-block one.
    kwargs = dict(SMALL, ar_step=0, causal_block_size=2, causal_attention=True, mode="kvcache", seed=3)
    latent = -(-(num_frames - 1) // 4) + 1
    whole = official_pipeline.generate("a red circle", num_frames=whole_blocks_frames, output="latent", **kwargs)
    cut = official_pipeline.generate("a red circle", num_frames=num_frames, output="latent", **kwargs)
    assert cut.shape == (16, latent, 4, 4)
    assert np.abs(cut - whole[:, :latent]).max() <= 1e-6
    whole_frames = official_pipeline.generate("a red circle", num_frames=whole_blocks_frames, **kwargs)
    frames = official_pipeline.generate("a red circle", num_frames=num_frames, **kwargs)
    assert frames.shape == (num_frames, 32, 32, 3)
    assert np.array_equal(frames, whole_frames[:num_frames])


def test_kvcache_stream_defaults_to_one_block_in_flight(official_pipeline):
    # No ar_step: a kvcache stream runs (one block at a time, ar_step = num_inference_steps), and
    # is the very stream that ar_step=num_inference_steps gives.
    kwargs = dict(height=32, width=32, num_inference_steps=3, guidance_scale=1.0, causal_block_size=1, seed=2,
                  max_chunks=3, output="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        default = list(official_pipeline.stream("x", mode="kvcache", **kwargs))
        explicit = list(official_pipeline.stream("x", mode="kvcache", ar_step=3, **kwargs))
        other = list(official_pipeline.stream("x", mode="kvcache", ar_step=1, **kwargs))
    assert [c.shape[1] for c in default] == [1, 1, 1]
    assert all(np.array_equal(a, b) for a, b in zip(default, explicit))
    assert not all(np.array_equal(a, b) for a, b in zip(default, other))  # ar_step matters: the check can fail


def test_endless_sync_stream_is_refused_with_a_fix(official_pipeline):
    with pytest.raises(ValueError, match="ar_step >= 1"):
        next(official_pipeline.stream("x", mode="kvcache", ar_step=0, height=32, width=32))


def test_video_extension_commits_the_input_tail(official_pipeline, tmp_path):
    # V2V: the input video's last overlap_history frames are encoded and enter the cache as committed
    # blocks; the result equals the block-causal window mode (latents) and starts with the input video.
    video = np.random.default_rng(8).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    kwargs = dict(SMALL, num_frames=13, base_num_frames=13, overlap_history=5, ar_step=1, causal_block_size=1,
                  causal_attention=True, seed=4, video=video)
    window = official_pipeline.generate("a red circle", output="latent", **kwargs)
    cached = official_pipeline.generate("a red circle", output="latent", mode="kvcache", **kwargs)
    print(f"max |kvcache - window| = {np.abs(cached - window).max():.3g} (V2V)")
    assert cached.shape == window.shape == (16, 2, 4, 4)  # 13 frames - 5 overlap = 8 new = 2 latent frames
    assert np.abs(cached - window).max() <= 1e-4
    frames = official_pipeline.generate("a red circle", mode="kvcache", **kwargs)
    assert frames.shape == (9 + 8, 32, 32, 3)
    assert np.abs(frames[:9].astype(int) - video.astype(int)).max() <= 1


def test_kvcache_refuses_what_a_cache_cannot_do(official_pipeline):
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="end image"):
        official_pipeline.generate("x", num_frames=9, mode="kvcache", end_image=image, **SMALL)
    with pytest.raises(ValueError, match="condition_noise='once'"):
        official_pipeline.generate("x", num_frames=9, mode="kvcache", image=image, addnoise_condition=20,
                                   condition_noise="step", **SMALL)


@pytest.mark.parametrize("mode", ["kvcache", "window"])
def test_stream_set_prompt_switches_at_the_next_chunk(official_pipeline, mode):
    red, blue = "a red circle " * 120, "a blue square " * 120  # long: see test_kvcache_reference.py
    kwargs = dict(mode=mode, ar_step=1, causal_block_size=1, base_num_frames=9, overlap_history=5, seed=2,
                  height=32, width=32, num_inference_steps=4, guidance_scale=1.0, output="latent", max_chunks=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = list(official_pipeline.stream(red, **kwargs))
        stream = official_pipeline.stream(red, **kwargs)
        switched = [next(stream), next(stream)]
        stream.set_prompt(blue, recache=True)
        assert stream.prompt == red  # takes effect with the next chunk
        switched += list(stream)
    assert stream.prompt == blue
    assert len(switched) == len(plain) == 5
    for before, after in zip(plain[:2], switched[:2]):
        np.testing.assert_array_equal(before, after)
    moved = max(np.abs(a - b).max() for a, b in zip(plain[2:], switched[2:]))
    print(f"{mode}: the switch moves later chunks by {moved:.3g}")
    assert moved > 1e-3


def test_stream_set_prompt_refuses_bad_input(official_pipeline):
    stream = official_pipeline.stream("x", height=32, width=32, num_inference_steps=1, max_chunks=1)
    with pytest.raises(ValueError, match="prompt must be a string"):
        stream.set_prompt(None)
    with pytest.raises(ValueError, match="negative_prompt"):
        stream.set_prompt("y", negative_prompt=3)


class _HostBuffer:
    """A host array standing in for one of the rollout core's Buffers (what core_tensor reads)."""

    device = "cpu"

    def __init__(self, array: np.ndarray):
        self.array, self.shape = array, array.shape

    def numpy(self) -> np.ndarray:
        return self.array


class _HostCore:
    """The rollout core's buffers a stream session reads and writes, as host arrays of one step's size."""

    def __init__(self, **arrays: np.ndarray):
        self.arrays = {name: _HostBuffer(a) for name, a in arrays.items()}

    def buffer(self, name: str, frames: int | None = None) -> _HostBuffer:
        return self.arrays[name]


def test_batched_cfg_step_equals_one_step_per_prompt(official_pipeline):
    """The torch backend's stream session runs cond and uncond as one batch: prompts of different
    lengths (padding collapsed per prompt) padded under a -inf bias, each against its own ring rows. It
    must give what one per-call step per prompt gives (tests/step_reference.py, batch 1), to fp32
    tolerance: velocity and the new K/V."""
    import step_reference
    from skyrt.runtime.backends.base import KVStepCall, KVStreamSpec

    backend = official_pipeline.backend
    layers, heads, head_dim = backend.kv_layout()
    contexts = [backend.encode_text(p) for p in ("a red fox running through snow", "")]
    prompts = [step_reference.kv_prompt(backend, c) for c in contexts]
    assert prompts[0][0].k.shape[1] != prompts[1][0].k.shape[1]  # the padding case is exercised
    rng = np.random.default_rng(0)
    frames, h, w, slots = 2, 4, 4, 3  # latent frames of one block, latent size (32 px / 8), ring slots
    tokens = frames * (h // 2) * (w // 2)
    caches = []
    for _ in prompts:
        cache = step_reference.new_kv_cache(backend, layers, slots, tokens, heads, head_dim)
        cache.k[:] = rng.standard_normal(cache.k.shape, dtype=np.float32)
        cache.v[:] = rng.standard_normal(cache.v.shape, dtype=np.float32)
        caches.append(cache)
    latents = rng.standard_normal((16, frames, h, w), dtype=np.float32)
    timesteps = np.array([700.0, 300.0], np.float32)
    ring = (layers, 2, slots * tokens, heads, head_dim)
    core = _HostCore(latents_in=np.stack([latents, latents]), velocity=np.zeros((2, 16, frames, h, w), np.float32),
                     new_k=np.zeros((layers, 2, tokens, heads, head_dim), np.float32),
                     new_v=np.zeros((layers, 2, tokens, heads, head_dim), np.float32),
                     cache_k=np.stack([c.k.reshape(ring[:1] + ring[2:]) for c in caches], axis=1),
                     cache_v=np.stack([c.v.reshape(ring[:1] + ring[2:]) for c in caches], axis=1))
    spec = KVStreamSpec(contexts=2, causal_block_size=frames, max_frames=frames, slots=slots, latent_size=(h, w),
                        layers=layers, heads=heads, head_dim=head_dim, fps_class=None)
    session = backend.open_kv_stream(spec)
    session.bind(core)
    session.set_prompts(contexts)
    for valid in ([True, False, True], [True, True, True], [False, False, False]):
        session.step(KVStepCall(frames=frames, timesteps=timesteps, position=4, slot_valid=np.array(valid),
                                want_kv=True))
        for b, (prompt, cache) in enumerate(zip(prompts, caches)):
            want = step_reference.kv_step(backend, latents, timesteps, prompt, cache, np.array(valid), 4, None, frames)
            got = (core.arrays["velocity"].array[b], core.arrays["new_k"].array[:, b], core.arrays["new_v"].array[:, b])
            for g, w_ in zip(got, want):
                np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-4)
    session.close()
