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
    dict(num_frames=9, ar_step=1, causal_block_size=1, image=True),  # I2V: the image is a committed block
])
def test_kvcache_equals_block_causal_window_mode(official_pipeline, settings):
    kwargs = {**SMALL, **settings}
    if kwargs.pop("image", False):
        kwargs["image"] = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
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
                                               window_blocks=2, max_chunks=30, seed=0, height=32, width=32,
                                               num_inference_steps=4, guidance_scale=1.0))
    frames = np.concatenate(chunks)
    assert frames.shape == (1 + 4 * 29, 32, 32, 3)
    assert len(rebases) >= 3 and all(s > 0 for s in rebases)


def test_endless_sync_stream_is_refused_with_a_fix(official_pipeline):
    with pytest.raises(ValueError, match="ar_step >= 1"):
        next(official_pipeline.stream("x", mode="kvcache", ar_step=0, height=32, width=32))
