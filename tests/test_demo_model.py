"""The shipped demo model (skyrt-demo-world-v6): loads like a real checkpoint, follows prompts.

The detector (demo/skyrt_demo/detector.py) reads generated clips back into attributes; the shipped
model must score above a floor on held-out prompt combinations (never seen in training), and the
same architecture with random DiT weights, run the same way, must not reach that floor: the score
comes from what training taught the DiT, not from the VAE, the text encoder or the detector.

    python -m pytest tests/test_demo_model.py -q
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest

import skyrt
from skyrt_demo import detector as D
from skyrt_demo import world as W
from skyrt.runtime.default_model import DEMO_META, DEMO_MODEL_NAME, SHIPPED_DEMO_MODEL, default_model_dir, recommended_sampling
from skyrt.runtime.model_folder import inspect_model_folder

# The package ships the model: a checkout without it fails here instead of skipping.
assert (SHIPPED_DEMO_MODEL / "config.json").is_file(), f"the built-in demo model is missing: {SHIPPED_DEMO_MODEL}"

# Mean detector adherence (5 attributes) the trained model must keep on held-out prompts. Measured on
# these 4 clips: the shipped model 0.90 (background, colour, motion, camera right; the shape in 2 of 4: both
# crosses read as diamonds), the same with 8 different noise seeds per clip (0.90 every time: the misreads
# are the model's, not the noise's), its VAE and text encoder with a random DiT 0.15. The floor is the
# measurement less one attribute reading of one clip (0.05), for float differences on other CPUs, which
# act like another noise draw at most; a model that loses two readings fails.
FLOOR = 0.85
CLIPS, CHUNKS = 4, 6  # held-out prompts, and stream chunks per clip (6 blocks of 2 latent frames: 45 frames)


def _heldout_prompts(count: int) -> list[W.Attributes]:
    heldout = W.combinations("heldout")
    rng = np.random.default_rng(7)
    return [heldout[int(i)] for i in rng.choice(len(heldout), size=count, replace=False)]


def _adherence(model_dir, prompts) -> list[float]:
    """Detector adherence of the first CHUNKS chunks of a stream per prompt, at the model's
    recommended settings (what `skyrt serve` runs)."""
    pipe = skyrt.load(model_dir)
    settings = recommended_sampling(default_model_dir())
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, attrs in enumerate(prompts):
            stream = pipe.stream(attrs.prompt, seed=k, max_chunks=CHUNKS, **settings)
            frames = np.concatenate(list(stream))
            scores.append(D.score_clip(frames, attrs).adherence)
    return scores


def test_shipped_model_is_an_official_layout_folder_within_budget():
    folder = default_model_dir()
    spec = inspect_model_folder(folder)
    assert spec.layout == "official"
    config = json.loads((folder / "config.json").read_text())
    assert config["num_frame_per_block"] == 2  # block-causal: the KV-cached rollout is exact for it
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"{total / 2**20:.1f} MiB"
    meta = json.loads((folder / DEMO_META).read_text())
    assert meta["name"] == DEMO_MODEL_NAME
    # The card describes the model, not the machine it was trained on.
    assert not [k for k, v in meta["config"].items() if isinstance(v, str) and v.startswith("/")], meta["config"]
    card = (folder / "model_card.md").read_text()
    assert "flow-matching loss" in card and "reproduce" in card
    settings = recommended_sampling(folder)
    assert settings["height"] >= 128 and settings["width"] >= 128 and settings["mode"] == "kvcache"


@pytest.fixture(scope="module")
def random_dit_model(tmp_path_factory):
    """The shipped folder with its DiT weights replaced by random ones of the same shapes (VAE,
    text encoder and tokenizer kept)."""
    from safetensors.torch import save_file

    from skyrt.export.dit import DiTConfig, WanDiT
    from skyrt.export.tiny import randomize_

    folder = tmp_path_factory.mktemp("random") / "model"
    shutil.copytree(default_model_dir(), folder)
    config = DiTConfig.from_official(json.loads((folder / "config.json").read_text()))
    dit = randomize_(WanDiT(config), seed=3)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def test_shipped_model_follows_heldout_prompts_and_random_weights_do_not(random_dit_model):
    prompts = _heldout_prompts(CLIPS)
    trained = _adherence(default_model_dir(), prompts)
    random = _adherence(random_dit_model, prompts)
    print(f"held-out adherence: trained {np.mean(trained):.3f} {trained}, random DiT {np.mean(random):.3f} {random}")
    assert np.mean(trained) >= FLOOR, trained
    assert np.mean(random) < FLOOR, random


def test_cli_defaults_come_from_the_shipped_model(official_dir):
    from skyrt.runtime.cli import OFFICIAL_SAMPLING, _generate_settings, build_parser, serve_sampling
    from skyrt.runtime.resolve import folder_layers, resolve_request

    recommended = recommended_sampling(default_model_dir())
    shipped = folder_layers(default_model_dir())  # what the loaded model reports, read without loading it

    def generate(argv, model=shipped):
        return resolve_request(_generate_settings(build_parser().parse_args(["generate", *argv]), "p"), model).request

    def serve(argv):
        settings, prompt = serve_sampling(build_parser().parse_args(["serve", *argv]))
        user = {**settings.user, "prompt": prompt.prompt}
        return resolve_request(dataclasses.replace(settings, user=user), shipped, stream=True).request

    for request in (generate([]), serve([])):
        assert {k: getattr(request, k) for k in recommended} == recommended
    # An explicit flag wins over the recommendation.
    assert serve(["--height", "192"]).height == 192
    # A real checkpoint recommends nothing: generate falls back to the official T2V settings.
    request = generate(["--model", str(official_dir)], folder_layers(official_dir))
    assert {k: getattr(request, k) for k in OFFICIAL_SAMPLING} == OFFICIAL_SAMPLING


def _mp4_frames(path) -> list:
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_generate_with_only_prompt_and_output_works_on_the_built_in_model(tmp_path):
    # The first command a newcomer types: every other setting comes from the built-in model's
    # recommendation (kvcache, blocks of 2 latent frames) and the CLI's 97 frames (25 latents: not
    # whole blocks, so the clip is denoised as 13 blocks and cut). Run as the installed command.
    import subprocess
    import sys

    out = tmp_path / "x.mp4"
    command = [sys.executable, "-m", "skyrt.runtime.cli", "generate", "--prompt", "a red circle bouncing on a dark "
               "blue background", "--output", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    frames = _mp4_frames(out)
    size = recommended_sampling(default_model_dir())["height"]
    assert len(frames) == 97 and frames[0].shape == (size, size, 3)


@pytest.mark.parametrize("num_frames", [93, 1])
def test_generate_returns_exactly_the_frames_asked_for(tmp_path, num_frames):
    from skyrt.runtime.cli import main

    out = tmp_path / "x.mp4"
    assert main(["generate", "--prompt", "a green square", "--num-frames", str(num_frames), "--output", str(out),
                 "--no-progress"]) == 0
    assert len(_mp4_frames(out)) == num_frames


def test_window_mode_rounds_a_recommended_block_size_and_says_so(tmp_path, capsys):
    # Window mode keeps refusing clips that are not whole blocks, but the built-in model's recommended
    # causal_block_size=2 is a default, not the user's choice: 9 frames (3 latents) become 13 (4), with a note.
    from skyrt.runtime.cli import main

    out = tmp_path / "w.mp4"
    assert main(["generate", "--prompt", "a green square", "--mode", "window", "--num-frames", "9", "--output",
                 str(out), "--no-progress"]) == 0
    assert "generating 13 frames" in capsys.readouterr().err
    assert len(_mp4_frames(out)) == 13
    # Chosen explicitly, the block size is the user's: refused with a fix, as the official code would mishandle it.
    assert main(["generate", "--prompt", "a green square", "--mode", "window", "--num-frames", "9",
                 "--causal-block-size", "2", "--output", str(out), "--no-progress"]) == 2
    assert "not divisible by causal_block_size=2" in capsys.readouterr().err
