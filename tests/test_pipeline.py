"""The window-mode pipeline against diffusers' SkyReelsV2DiffusionForcingPipeline as the oracle.

The oracle runs with a UniPC scheduler given the official shifted sigmas (that makes
diffusers' UniPC the official FlowUniPC; tests/test_scheduler.py checks it). Noise is shared by recording every draw skyrt makes and
replaying the same arrays into diffusers' randn_tensor / torch.randn_like, in the same order.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from skyrt.runtime import latents as lat
from skyrt.runtime import pipeline as pipeline_module

SMALL = dict(height=32, width=32, num_inference_steps=4, shift=8.0, guidance_scale=5.0)


class RecordingRNG:
    """Stands in for numpy's Generator inside skyrt: real draws, remembered in order."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)
        self.draws: list[np.ndarray] = []

    def standard_normal(self, shape, dtype=np.float32):
        out = self._rng.standard_normal(shape, dtype=dtype)
        self.draws.append(out.copy())
        return out


class Replay:
    """Hands the recorded arrays to diffusers, checking each requested shape."""

    def __init__(self, draws):
        self.draws = list(draws)

    def next(self, shape) -> torch.Tensor:
        array = self.draws.pop(0)
        assert tuple(shape) == (1, *array.shape), f"oracle asked for {tuple(shape)}, skyrt drew {array.shape}"
        return torch.from_numpy(array)[None]


def run_skyrt(pipe, monkeypatch, **kwargs):
    recorder = RecordingRNG(seed=1234)
    monkeypatch.setattr(pipeline_module.np.random, "default_rng", lambda seed=None: recorder)
    out = pipe.generate("a red circle bouncing", negative_prompt="blurry", progress=False, **kwargs)
    monkeypatch.undo()
    return out, recorder.draws


def run_oracle(oracle_pipe, draws, monkeypatch, **kwargs):
    """diffusers' pipeline with the official sigmas and skyrt's noise."""
    from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2_diffusion_forcing as df_module
    from checkpoints import official_sigmas_scheduler

    replay = Replay(draws)
    monkeypatch.setattr(df_module, "randn_tensor", lambda shape, **_: replay.next(shape))
    monkeypatch.setattr(df_module.torch, "randn_like", lambda x, **_: replay.next(x.shape).to(x.dtype))
    oracle_pipe.scheduler = official_sigmas_scheduler(kwargs.pop("shift"))
    # diffusers' `latents=` argument breaks its own prepare_latents (it returns one tensor where
    # four values are unpacked), so every window's noise, the first too, goes in through randn_tensor.
    with torch.no_grad():
        out = oracle_pipe("a red circle bouncing", negative_prompt="blurry", output_type="latent", **kwargs).frames
    monkeypatch.undo()
    assert not replay.draws, "skyrt drew noise that the oracle never used"
    return out[0].numpy()


@pytest.mark.parametrize("settings", [
    dict(num_frames=9, ar_step=0),  # synchronous, one window
    dict(num_frames=17, ar_step=1),  # asynchronous, one window
    dict(num_frames=17, ar_step=0, guidance_scale=1.0),  # no CFG
    dict(num_frames=13, ar_step=1, causal_block_size=2, causal_attention=True),  # async, block-causal mask
])
def test_single_window_equals_diffusers(official_pipeline, oracle_pipe, monkeypatch, settings):
    kwargs = {**SMALL, **settings}
    ours, draws = run_skyrt(official_pipeline, monkeypatch, output="latent", **kwargs)
    oracle_kwargs = {k: v for k, v in kwargs.items() if k != "causal_attention"}
    if not kwargs.get("causal_attention"):
        oracle_kwargs.pop("causal_block_size", None)  # diffusers masks whenever it is given one > 1
    try:
        theirs = run_oracle(oracle_pipe, draws, monkeypatch, base_num_frames=kwargs["num_frames"], **oracle_kwargs)
    finally:
        oracle_pipe.transformer._set_ar_attention(1)  # diffusers writes the mask setting into the model
    print(f"max |skyrt - diffusers| = {np.abs(ours - theirs).max():.3g} for {settings}")
    assert ours.shape == theirs.shape == (16, lat.latent_length(kwargs["num_frames"]), 4, 4)
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.parametrize("addnoise", [0, 20])
def test_long_video_latent_carry_equals_diffusers(official_pipeline, oracle_pipe, monkeypatch, addnoise):
    # 5 latent frames in windows of 3 with 2 overlapping: three windows, the last two with prefixes.
    kwargs = dict(SMALL, num_frames=17, base_num_frames=9, overlap_history=5, ar_step=0,
                  addnoise_condition=addnoise)
    ours, draws = run_skyrt(official_pipeline, monkeypatch, output="latent", overlap_carry="latent", **kwargs)
    theirs = run_oracle(oracle_pipe, draws, monkeypatch, **kwargs)
    assert ours.shape == theirs.shape == (16, 5, 4, 4)
    assert np.abs(ours - theirs).max() <= 1e-4


def test_frames_equal_diffusers_decode(official_pipeline, oracle_pipe, monkeypatch):
    kwargs = dict(SMALL, num_frames=9)
    frames, draws = run_skyrt(official_pipeline, monkeypatch, **kwargs)
    z = run_oracle(oracle_pipe, draws, monkeypatch, base_num_frames=9, **kwargs)
    mu = torch.from_numpy(lat.denormalize(z))[None]
    with torch.no_grad():
        video = oracle_pipe.vae.decode(mu, return_dict=False)[0][0]  # [3, T, H, W]
    expected = ((video / 2 + 0.5).clamp(0, 1) * 255).permute(1, 2, 3, 0).numpy()
    assert frames.dtype == np.uint8 and frames.shape == (9, 32, 32, 3)
    # skyrt truncates like the official pipeline; allow one level for fp32 noise at the edges.
    assert np.abs(frames.astype(np.float32) - np.floor(expected)).max() <= 1


def test_seed_is_deterministic(official_pipeline):
    a = official_pipeline.generate("x", num_frames=5, seed=3, output="latent", progress=False, **SMALL)
    b = official_pipeline.generate("x", num_frames=5, seed=3, output="latent", progress=False, **SMALL)
    c = official_pipeline.generate("x", num_frames=5, seed=4, output="latent", progress=False, **SMALL)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_supplied_latents_are_the_initial_noise(official_pipeline):
    noise = np.random.default_rng(0).standard_normal((16, 2, 4, 4), dtype=np.float32)
    a = official_pipeline.generate("x", num_frames=5, latents=noise, seed=1, output="latent", progress=False, **SMALL)
    b = official_pipeline.generate("x", num_frames=5, latents=noise, seed=2, output="latent", progress=False, **SMALL)
    assert np.array_equal(a, b)


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_i2v_first_latent_is_the_encoded_image(official_pipeline):
    image = _image()
    z = official_pipeline.generate("x", num_frames=9, image=image, output="latent", seed=0, progress=False, **SMALL)
    encoded = official_pipeline._encode_pixels(np.asarray(image, np.float32).transpose(2, 0, 1)[:, None] / 127.5 - 1)
    assert np.array_equal(z[:, :1], encoded)
    frames = official_pipeline.generate("x", num_frames=9, image=image, seed=0, progress=False, **SMALL)
    assert frames.shape == (9, 32, 32, 3)


def test_end_image_is_pinned_and_not_in_the_video(official_pipeline):
    z = official_pipeline.generate("x", num_frames=9, image=_image(0), end_image=_image(1), output="latent", seed=0,
                                   progress=False, **SMALL)
    assert z.shape[1] == 3  # the end image's latent conditions the window but is not returned
    frames = official_pipeline.generate("x", num_frames=9, end_image=_image(1), seed=0, progress=False, **SMALL)
    assert frames.shape == (9, 32, 32, 3)


def test_v2v_output_starts_with_the_input_video(official_pipeline):
    video = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    for carry in ("pixel", "latent"):
        out = official_pipeline.generate("x", video=video, num_frames=13, base_num_frames=9, overlap_history=5,
                                         overlap_carry=carry, seed=0, progress=False, **SMALL)
        # The input goes through [-1, 1] floats and back with the official truncation: off by <= 1.
        assert np.abs(out[:9].astype(int) - video).max() <= 1
        # official extend: (13 - 1) // 4 + 1 = 4 latents, 2 of them the overlap -> 2 new latents = 8 frames
        assert out.shape == (9 + 8, 32, 32, 3), carry


def test_pixel_carry_reencodes_the_stitched_tail(official_pipeline, monkeypatch):
    backend = official_pipeline.backend
    decoded, encoded = [], []
    real_decode, real_encode = backend.vae_decode, backend.vae_encode
    monkeypatch.setattr(backend, "vae_decode", lambda mu: decoded.append(real_decode(mu)) or decoded[-1])
    monkeypatch.setattr(backend, "vae_encode", lambda px: encoded.append(px.copy()) or real_encode(px))
    frames = official_pipeline.generate("x", num_frames=17, base_num_frames=9, overlap_history=5, seed=0,
                                        overlap_carry="pixel", progress=False, **SMALL)
    monkeypatch.undo()
    assert frames.shape == (17, 32, 32, 3)
    assert len(decoded) == 3 and len(encoded) == 2  # every window decoded; two prefixes re-encoded
    # Official stitching: window 0 whole, later windows without their first overlap_history frames;
    # each prefix is the re-encoded last overlap_history frames of the video stitched so far.
    stitched = decoded[0]
    for window, prefix_pixels in zip(decoded[1:], encoded):
        assert np.array_equal(prefix_pixels, stitched[:, -5:])
        stitched = np.concatenate([stitched, window[:, 5:]], axis=1)
    expected = (np.clip(stitched / 2 + 0.5, 0, 1) * 255).transpose(1, 2, 3, 0).astype(np.uint8)
    assert np.array_equal(frames, expected)


def test_stream_equals_generate_with_latent_carry(official_pipeline):
    kwargs = dict(SMALL, base_num_frames=9, overlap_history=5, seed=7)
    chunks = list(official_pipeline.stream("x", max_chunks=3, **kwargs))
    streamed = np.concatenate(chunks)
    whole = official_pipeline.generate("x", num_frames=17, overlap_carry="latent", progress=False, **kwargs)
    assert streamed.shape == whole.shape == (17, 32, 32, 3)
    assert np.array_equal(streamed, whole)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(num_frames=9, causal_block_size=2), r"causal_block_size=2.*num_frames="),
    (dict(num_frames=9, height=40), r"height=40 must be a positive multiple of 16 .*; try height=32"),
    (dict(num_frames=9, width=100), r"width=100 .* try width=96"),
    (dict(num_frames=10), r"num_frames=10 must be of the form 1 \+ 4k .*; try num_frames=9"),
    (dict(num_frames=17, base_num_frames=9, overlap_history=9), r"overlap_history=9 must be smaller than base_num_frames=9"),
    (dict(num_frames=17, base_num_frames=9), r"overlap_history"),
    (dict(num_frames=9, ar_step=-1), r"ar_step=-1"),
    (dict(num_frames=9, mode="stream"), r"mode='stream'"),
    (dict(num_frames=9, output="video"), r"output='video'"),
    (dict(num_frames=9, image=np.zeros((32, 32, 3), np.uint8), causal_block_size=3), r"image conditioning"),
    (dict(num_frames=9, latents=np.zeros((16, 2, 4, 4), np.float32)), r"latents must be .*\(16, 3, 4, 4\)"),
])
def test_bad_input_is_refused_with_a_fix(official_pipeline, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        official_pipeline.generate("x", progress=False, **{**SMALL, **kwargs})


def test_cli_generate_writes_an_mp4(official_dir, tmp_path):
    import av

    from skyrt.runtime.cli import main

    out = tmp_path / "out.mp4"
    rc = main(["generate", "--model", str(official_dir), "--prompt", "a red circle", "--num-frames", "9",
               "--height", "32", "--width", "32", "--steps", "2", "--seed", "0", "--output", str(out), "--no-progress"])
    assert rc == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = [f for f in container.decode(video=0)]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 32, 32)
    assert len(frames) == 9


def test_cli_bad_input_exits_2_with_one_line(official_dir, tmp_path, capsys):
    from skyrt.runtime.cli import main

    rc = main(["generate", "--model", str(official_dir), "--num-frames", "10", "--height", "32", "--width", "32",
               "--output", str(tmp_path / "x.mp4")])
    assert rc == 2
    assert "num_frames=10" in capsys.readouterr().err
