"""A causal preset's stream started from an image or a clip (runtime/stream_start.py, Pipeline._preset_start).

The start is committed into the rollout core's cache as clean blocks (one clean pass each, never run
again). The oracle recomputes it instead: every DiT call is one block-causal full forward over the
start, every finished block and the block being denoised, from position 0, no cache at all (the
torch backend's predict_velocity), with their few-step sampler from the frozen host loop
(tests/causal_rollout_reference.py). For a block-causal checkpoint whose ring holds everything, the
two must agree to fp32 tolerance.

    python -m pytest -q tests/test_stream_start.py
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import skyrt
from causal_checkpoints import load_recipes, write_model_folder
from causal_rollout_reference import FewStepSchedule
import step_reference
from skyrt.runtime import latents as lat
from skyrt.runtime.backends.base import TextContext
from skyrt.runtime.stream_start import block_pixel_frames, clip_start, still_clip
from skyrt.runtime.video_io import load_video, to_model_pixels, to_uint8_frames, write_mp4

RECIPES = load_recipes()
TOLERANCE = 1e-4
SIZE = dict(height=32, width=48)  # latent 4 x 6


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    names = ("self_forcing", "causal_forcing_framewise", "longlive", "rolling_forcing")
    return {n: write_model_folder(RECIPES[n], tmp_path_factory.mktemp(n) / "model") for n in names}


def load(folders, name: str):
    recipe = RECIPES[name]
    options = {"lora_alpha": recipe["lora"]["alpha"]} if recipe.get("lora") else {}
    return skyrt.load(folders[name], preset=recipe["family"], **options)


def seeded_context(monkeypatch, pipe) -> None:
    """encode_text -> a seeded random context (the umT5 stand-in; the recipes' text_dim is 32)."""
    value = torch.from_numpy(np.random.default_rng(7).standard_normal((1, 512, 32), dtype=np.float32))
    monkeypatch.setattr(pipe.backend, "encode_text", lambda prompt: TextContext(prompt, value))


def an_image(seed: int = 0) -> np.ndarray:
    """A smooth uint8 [32, 48, 3] picture (gradients plus a square): something a VAE keeps."""
    y, x = np.mgrid[0:32, 0:48]
    img = np.stack([x * 5, y * 7, 255 - x * 4], -1).astype(np.float64)
    img[8:20, 10 + seed:26 + seed] = (250, 30, 60)
    return img.clip(0, 255).astype(np.uint8)


def recomputed_rollout(pipe, start: np.ndarray, blocks: int, seed: int) -> np.ndarray:
    """The oracle: start [16, P, h, w] model space, then `blocks` generated blocks, each DiT call a full
    block-causal forward over everything so far (clean frames at t = context_noise). Noise in the
    stream's order: per block its initial draw, then one re-noise draw after every step but the last."""
    sampling = pipe.preset.sampling
    schedule = FewStepSchedule.from_sampling(sampling, sampling.timestep_shift)
    b = sampling.causal_block_size
    context = pipe.backend.encode_text("a")
    rng = np.random.default_rng(seed)
    clean = [start]
    for _ in range(blocks):
        history = np.concatenate(clean, axis=1)
        x = rng.standard_normal((lat.LATENT_CHANNELS, b, *start.shape[2:]), dtype=np.float32)
        for step in range(len(schedule)):
            t = np.concatenate([np.full(history.shape[1], sampling.context_noise, np.float32),
                                np.full(b, schedule.timesteps[step], np.float32)])
            v = step_reference.predict_velocity(pipe.backend, np.concatenate([history, x], axis=1), t, context, None,
                                                b)[:, -b:]
            x0 = schedule.x0(x, v, step)
            if step + 1 < len(schedule):
                x = schedule.renoise(x0, rng.standard_normal(x.shape, dtype=np.float32), step + 1)
        clean.append(x0)
    return np.concatenate(clean, axis=1)


def encoded(pipe, frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> model-space latents through the backend's Wan VAE encoder."""
    return lat.normalize(pipe.backend.vae_encode(to_model_pixels(frames)))


def still_decoded(pipe, image: np.ndarray, block: int = 3) -> np.ndarray:
    """The frames a start from `image` shows first: its still block through the (random) VAE and back."""
    return to_uint8_frames(pipe.backend.vae_decode(lat.denormalize(encoded(pipe, still_clip(image, block)))))


# ------------------------------------------------------------------------------------------ the start
def test_a_still_clip_is_one_block_whose_first_latent_is_the_image(folders):
    pipe = load(folders, "self_forcing")
    img = an_image()
    clip = still_clip(img, 3)
    assert clip.shape == (9, 32, 48, 3) and block_pixel_frames(1, 3) == 9
    z = encoded(pipe, clip)
    assert z.shape == (16, 3, 4, 6)
    # The causal VAE encodes frame 0 alone: the block's first latent is the image's I2V latent.
    assert np.abs(z[:, :1] - encoded(pipe, img[None])).max() <= 1e-5


def test_a_clip_keeps_its_last_whole_blocks_up_to_the_ring():
    frames = np.arange(30)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    assert len(clip_start(frames, 3, max_blocks=6)) == 21  # 30 frames cover 8 latents: 2 blocks of 3
    assert clip_start(frames, 3, max_blocks=6)[0, 0, 0, 0] == 9  # the last 21
    assert len(clip_start(frames, 3, max_blocks=1)) == 9
    assert len(clip_start(frames, 1, max_blocks=4)) == 13
    with pytest.raises(ValueError, match="needs at least 9"):
        clip_start(frames[:8], 3, max_blocks=6)


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", ["self_forcing", "causal_forcing_framewise", "longlive"])
def test_committed_start_equals_recomputing_it(folders, monkeypatch, name):
    """stream(image=...) on the core (start committed once) == the no-cache recompute oracle."""
    pipe = load(folders, name)
    seeded_context(monkeypatch, pipe)
    b = pipe.preset.sampling.causal_block_size
    img = an_image()
    generated = 3
    stream = pipe.stream("a", image=img, output="latent", seed=3, **SIZE)
    ours = np.concatenate([next(stream) for _ in range(1 + generated)], axis=1)
    stream.close()
    theirs = recomputed_rollout(pipe, encoded(pipe, still_clip(img, b)), generated, seed=3)
    err = np.abs(ours - theirs).max()
    print(f"{name}: start of {b} latent frame(s) + {generated} blocks, max |committed - recomputed| = {err:.2e}")
    assert ours.shape == theirs.shape and err <= TOLERANCE
    # The oracle has teeth: without the start, the first generated block is another one.
    without = pipe.stream("a", output="latent", seed=3, **SIZE)
    assert np.abs(next(without) - theirs[:, b:2 * b]).max() > 100 * TOLERANCE
    without.close()


def test_video_start_commits_its_last_blocks_and_output_starts_with_the_video(folders, monkeypatch, tmp_path):
    """generate(video=...) under a preset: the clip's last 2 blocks are the start, the frames returned
    are the input video itself, then the generated frames (the V2V contract of the DF path)."""
    pipe = load(folders, "self_forcing")
    seeded_context(monkeypatch, pipe)
    video = np.stack([np.roll(an_image(), 2 * i, axis=1) for i in range(23)])  # 23 frames: 2 blocks of 3
    path = tmp_path / "in.mp4"
    write_mp4(video, path, fps=16)
    decoded = load_video(path, 48, 32)
    z = pipe.generate("a", video=path, num_frames=21 + 4 * 6, output="latent", seed=4, progress=False, **SIZE)
    assert z.shape == (16, 6, 4, 6)  # V2V: latents leave out the start (its 6 latent frames)
    frames = pipe.generate("a", video=path, num_frames=21 + 4 * 6, seed=4, progress=False, **SIZE)
    assert frames.shape == (23 + 24, 32, 48, 3)
    # the input itself, through [-1, 1] and back (the official truncation loses at most 1)
    assert np.abs(frames[:23].astype(int) - decoded).max() <= 1


def test_video_start_stream_equals_recomputing_it(folders, monkeypatch, tmp_path):
    pipe = load(folders, "self_forcing")
    seeded_context(monkeypatch, pipe)
    video = np.stack([np.roll(an_image(), 2 * i, axis=1) for i in range(21)])
    stream = pipe.stream("a", video=video, output="latent", seed=2, **SIZE)
    ours = np.concatenate([next(stream) for _ in range(2 + 2)], axis=1)
    stream.close()
    theirs = recomputed_rollout(pipe, encoded(pipe, video), 2, seed=2)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_rolling_forcing_starts_from_an_image(folders, monkeypatch):
    """Rolling-Forcing's window (full attention, the sink re-rotated) has no block-causal recompute to
    compare with; its start is committed as block 0 (the sink) and changes what follows."""
    pipe = load(folders, "rolling_forcing")
    seeded_context(monkeypatch, pipe)
    img = an_image()
    stream = pipe.stream("a", image=img, output="latent", seed=1, **SIZE)
    first, following = next(stream), np.concatenate([next(stream) for _ in range(3)], axis=1)
    stream.close()
    assert np.abs(first - encoded(pipe, still_clip(img, 3))).max() <= 1e-6  # the start, as committed
    without = pipe.stream("a", output="latent", seed=1, **SIZE)
    plain = np.concatenate([next(without) for _ in range(3)], axis=1)
    without.close()
    assert np.isfinite(following).all() and np.abs(following - plain).max() > 1e-2


# ------------------------------------------------------------------------------------------ refusals
def test_bad_starts_are_named(folders, tmp_path):
    pipe = load(folders, "self_forcing")
    with pytest.raises(FileNotFoundError, match="image file not found"):
        pipe.generate("a", image=tmp_path / "missing.png", num_frames=33, progress=False, **SIZE)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png.*not an image"):
        pipe.generate("a", image=tmp_path / "junk.png", num_frames=33, progress=False, **SIZE)
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="junk.mp4.*not a video"):
        pipe.generate("a", video=tmp_path / "junk.mp4", num_frames=33, progress=False, **SIZE)
    with pytest.raises(ValueError, match="needs at least 9"):
        pipe.generate("a", video=np.zeros((5, 32, 48, 3), np.uint8), num_frames=33, progress=False, **SIZE)
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        pipe.generate("a", image=an_image(), num_frames=9, progress=False, **SIZE)
    with pytest.raises(ValueError, match="end_image"):
        pipe.generate("a", end_image=an_image(), num_frames=33, progress=False, **SIZE)
    with pytest.raises(ValueError, match="uint8"):
        pipe.generate("a", image=np.zeros((32, 48), np.float32), num_frames=33, progress=False, **SIZE)


# ------------------------------------------------------------------------------------------ routes
def write_png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(image).save(path)
    return path


def test_cli_generate_and_serve_take_a_start(folders, tmp_path, monkeypatch):
    from skyrt.runtime import cli

    png, out = write_png(tmp_path / "start.png", an_image()), tmp_path / "out.mp4"
    model = folders["self_forcing"]
    base = ["generate", "--model", str(model), "--preset", "self-forcing", "--prompt", "a", "--height", "32", "--width", "48",
            "--no-progress", "--output", str(out)]
    assert cli.main([*base, "--num-frames", "21", "--image", str(png)]) == 0
    frames = load_video(out, 48, 32)
    assert len(frames) == 21  # the still block's 9 frames, then 12 generated
    pipe = load(folders, "self_forcing")
    expected = still_decoded(pipe, an_image())
    text_only = pipe.generate("a", num_frames=9, progress=False, **SIZE)
    # The start's frames, through H.264 (lossy on the random VAE's busy pictures), far closer than text alone.
    assert np.abs(frames[:9].astype(int) - expected).mean() < 0.3 * np.abs(text_only.astype(int) - expected).mean()
    clip = tmp_path / "clip.mp4"
    write_mp4(np.stack([np.roll(an_image(), i, axis=1) for i in range(9)]), clip, fps=16)
    assert cli.main([*base, "--num-frames", "21", "--video", str(clip)]) == 0
    assert len(load_video(out, 48, 32)) == 9 + 12  # the input, then 21 - 9 generated frames
    assert cli.main([*base, "--num-frames", "21", "--image", str(tmp_path / "nope.png")]) == 2
    seen = {}
    monkeypatch.setattr("skyrt.runtime.server.serve", lambda spec, sampling, config, **kw: seen.update(
        sampling=sampling, config=config))
    assert cli.main(["serve", "--model", str(model), "--preset", "self-forcing", "--no-token", "--video", str(clip),
                     "--media-dir", str(tmp_path)]) == 0
    assert seen["sampling"].user == {"video": str(clip)} and seen["config"].limits.media_dir == str(tmp_path)


def test_playlist_items_start_from_files_inside_the_media_folder(tmp_path):
    from skyrt.runtime.server.playlist import Limits, RequestError, load_playlist, parse_playlist

    media = tmp_path / "media"
    media.mkdir()
    write_png(media / "lobby.png", an_image())
    write_mp4(np.stack([an_image()] * 9), media / "clip.mp4", fps=16)
    (media / "junk.png").write_bytes(b"no")
    write_png(tmp_path / "outside.png", an_image())
    limits = Limits(media_dir=str(media))
    items = [{"prompt": "a", "duration_s": 5}, {"prompt": "b", "duration_s": 5, "image": "lobby.png"},
             {"prompt": "c", "duration_s": 5, "video": "clip.mp4", "transition": "recache"}]
    playlist = parse_playlist({"items": items}, limits)
    assert [i.change().start for i in playlist.items] == [
        None, ("image", str((media / "lobby.png").resolve())), ("video", str((media / "clip.mp4").resolve()))]
    sent = playlist.to_json()["items"]  # what the client sent, no resolved paths
    assert (sent[0].get("image"), sent[1]["image"], sent[2]["video"]) == (None, "lobby.png", "clip.mp4")
    assert all("start_path" not in item and "video" not in item for item in sent[:2])
    for item, words in [({"image": "../outside.png"}, "outside the media folder"),
                        ({"image": str(tmp_path / "outside.png")}, "outside the media folder"),
                        ({"image": "missing.png"}, "no file"), ({"image": "junk.png"}, "not an image"),
                        ({"video": "junk.png"}, "not a video"), ({"image": 3}, "file name"),
                        ({"image": "lobby.png", "video": "clip.mp4"}, "not both")]:
        with pytest.raises(RequestError, match=words):
            parse_playlist({"items": [{"prompt": "x", "duration_s": 1, **item}]}, limits)
    with pytest.raises(RequestError, match="media folder"):
        parse_playlist({"items": [{"prompt": "x", "duration_s": 1, "image": "lobby.png"}]}, Limits())
    path = media / "playlist.json"
    path.write_text(json.dumps({"items": items}))
    assert load_playlist(path).items[1].start_path == str((media / "lobby.png").resolve())  # its folder by default


def test_a_playlist_start_restarts_the_stream_from_its_file(folders, monkeypatch, tmp_path):
    """The server's generator thread: a change carrying a start (a playlist item's image) ends the running
    stream and opens one from that file, whose first chunk is the image's still block; a plain prompt
    change goes to the running stream."""
    import time

    from skyrt.runtime.server.generator import FrameBuffer, GeneratorThread, Metrics
    from skyrt.runtime.server.playlist import PromptBoard, PromptChange

    pipe = load(folders, "self_forcing")
    seeded_context(monkeypatch, pipe)
    opened, first_chunks = [], []
    real_stream = pipe.stream

    class Recorded:
        """The pipeline's stream, its first chunk kept."""

        def __init__(self, stream):
            self.stream, self.first = stream, True

        def __iter__(self):
            return self

        def __next__(self):
            chunk = next(self.stream)
            if self.first:
                first_chunks.append(chunk)
                self.first = False
            return chunk

        def __getattr__(self, name):  # prompt, set_prompt, close
            return getattr(self.stream, name)

    def spy(**kwargs):
        opened.append({k: v for k, v in kwargs.items() if k != "request"})
        return Recorded(real_stream(**kwargs))

    monkeypatch.setattr(pipe, "stream", spy)
    png = write_png(tmp_path / "lobby.png", an_image())
    resolution = pipe.resolve({"prompt": "a", **SIZE}, stream=True)
    board = PromptBoard(PromptChange("a"))
    buffer = FrameBuffer(1000)
    generator = GeneratorThread(pipe, resolution, board, buffer, Metrics())
    generator.start()
    try:
        deadline = time.monotonic() + 60
        while not first_chunks and time.monotonic() < deadline:
            time.sleep(0.05)
        board.set_prompt(PromptChange("b"))  # a prompt switch: same stream
        board.set_prompt(PromptChange("lobby", start=("image", str(png))))
        while len(first_chunks) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        generator.stop()
        generator.join(30)
    assert opened[:2] == [{}, {"image": str(png)}]
    still = first_chunks[1]
    assert still.shape == (9, 32, 48, 3)
    expected = still_decoded(pipe, an_image())
    assert np.abs(still.astype(int) - expected).max() <= 1  # the image's still block, decoded
    assert np.abs(first_chunks[0].astype(int)[:1] - expected[:1]).mean() > 10  # the text-only stream's is not


def test_image_start_benchmark_runs_and_reads_the_start(tmp_path):
    """benchmarks/image_start.py at its smallest: one prompt, one seed, one block (the shipped demo model)."""
    from benchmark_scripts import load_benchmark

    out = tmp_path / "image_start.json"
    assert load_benchmark("image_start").main(["--prompts", "1", "--seeds", "1", "--blocks", "1", "--threads", "1",
                                               "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    summary = report["summary_per_generated_block"]
    assert set(summary) == {"text_only", "matching_image", "conflicting_image", "text_only_vs_conflicting_image"}
    assert report["settings"]["causal_block_size"] == 2 and report["frames_per_block"] == 8
    # The measurement can tell a start from none: the conflicting image is nearer its own start than text alone.
    assert summary["conflicting_image"]["pixel_mad"][0] < summary["text_only_vs_conflicting_image"]["pixel_mad"][0]
