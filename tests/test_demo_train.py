"""The demo model's training script (demo/skyrt_demo/train.py), end to end on a few iterations.

A smoke run at 64 x 64 trains the VAE and the DiT for a few steps (losses on fixed probe batches must
fall), writes the official-layout folder, which must load with skyrt.load and generate in both
rollout modes; a second call resumes from the checkpoints. Plus the exact pieces: the encoder's
moments, the latent re-parametrisation fold, the tokenizer's vocabulary.

    python -m pytest tests/test_demo_train.py -q
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from skyrt_demo import train as T
from skyrt_demo import world as W
from skyrt.export.vae import VAEConfig, WanVAE

SMOKE = ["--size", "64", "--vae-crop", "32", "--vae-steps", "8", "--vae-batch", "2", "--vae-long-steps", "3",
         "--vae-long-frames", "17", "--vae-long-crop", "32", "--vae-long-batch", "1", "--dataset-clips", "4",
         "--shard-clips", "2", "--dit-steps", "12", "--dit-lr", "2e-3", "--text-lr", "1e-3", "--warmup", "2",
         "--dit-batch-frames", "16", "--checkpoint-every", "6", "--log-every", "3", "--threads", "1",
         "--eval-clips", "1", "--no-progress"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    cfg = T.parse_args(["--out", str(out), *SMOKE])
    model_dir = T.Trainer(cfg).run()
    return out, model_dir


def test_smoke_run_losses_fall(smoke_run):
    out, model_dir = smoke_run
    meta = json.loads((model_dir / T.META_NAME).read_text())
    vae, dit = meta["summary"]["vae"], meta["summary"]["dit"]
    short, long = vae["phases"]
    assert (short["phase"], short["steps"], long["phase"], long["steps"]) == ("short", 8, "long", 3)
    assert dit["steps"] == 12
    # Fixed probe batches (same data, same noise) before and after training.
    assert short["probe_l1_end"] < 0.9 * short["probe_l1_start"], short
    assert len(long["stationarity"]["latent_drift_per_frame"]) == 13  # the still 49-frame probe, per latent
    assert dit["probe_loss_end"] < dit["probe_loss_start"], dit
    # The fold makes the fixed Wan2.1 normalisation standardise this VAE's latents, exactly.
    assert abs(vae["normalised_mean"]) < 1e-3 and vae["normalised_std"] == pytest.approx(1.0, abs=1e-3)
    assert vae["fold_max_abs_diff"] < 1e-4
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"vae", "dit"} and all(np.isfinite(r.get("loss", r.get("l1"))) for r in log)


def test_smoke_run_reports_prompt_sensitivity(smoke_run):
    _, model_dir = smoke_run
    meta = json.loads((model_dir / T.META_NAME).read_text())
    sensitivity = meta["summary"]["dit"]["prompt_sensitivity"]
    assert set(sensitivity) == set(W.ATTRIBUTE_NAMES)
    assert all(len(r) == len(T.SENSITIVITY_SIGMAS) and all(np.isfinite(v) and v > 0 for v in r.values())
               for r in sensitivity.values())
    assert "prompt sensitivity" in (model_dir / T.CARD_NAME).read_text()


def test_prompt_sensitivity_is_one_for_a_dit_that_ignores_the_prompt_and_not_for_one_that_reads_it():
    g = torch.Generator().manual_seed(0)
    prompts = [W.Attributes(s, c, "left", "black").prompt for s in W.SHAPES for c in ("red", "blue")]
    fg = torch.zeros(len(prompts), 3, 4, 4, dtype=torch.uint8)
    fg[:, :, 1:3, 1:3] = 1
    data = T.LatentData(latents=torch.randn(len(prompts), 16, 3, 4, 4, generator=g), prompts=prompts,
                        second_prompts=[""] * len(prompts), switch_latent=np.full(len(prompts), -1), fg=fg)
    # A "context" that encodes only the shape word: index of the shape in SHAPES, as a [B, 1, 1] tensor.
    shape_code = lambda ps: torch.tensor([[[float(W.SHAPES.index(W.parse_prompt(p).shape))]] for p in ps])  # noqa: E731

    def blind(x, t, context, causal_block_size):  # predicts velocity from x alone
        return 0.5 * x

    def reads_shape(x, t, context, causal_block_size):  # the prompt's shape moves its prediction
        return 0.5 * x + context.view(-1, 1, 1, 1, 1)

    flat = T.prompt_sensitivity(blind, shape_code, data, block=2)
    assert all(r == pytest.approx(1.0) for ratios in flat.values() for r in ratios.values()), flat
    read = T.prompt_sensitivity(reads_shape, shape_code, data, block=2)
    assert all(r != pytest.approx(1.0) for r in read["shape"].values()), read
    assert all(r == pytest.approx(1.0) for r in read["colour"].values()), read


def test_swap_word_changes_one_attribute_to_another_value():
    rng = np.random.default_rng(0)
    attrs = W.Attributes("circle", "red", "left", "black", "none")
    for name in W.ATTRIBUTE_NAMES:
        for _ in range(10):
            swapped = T.swap_word(attrs, name, rng)
            assert getattr(swapped, name) != getattr(attrs, name)
            assert all(getattr(swapped, n) == getattr(attrs, n) for n in W.ATTRIBUTE_NAMES if n != name)


def test_reproduce_command_gives_back_the_run_settings(tmp_path):
    import dataclasses

    cfg = T.parse_args(["--out", str(tmp_path / "a"), "--seed", "3", "--dit-steps", "77", "--train-shift", "5",
                        "--dit-edge-weight", "15", "--dit-init", "/somewhere/dit.pt", "--no-progress", "--threads", "2"])
    command = T.reproduce_command(cfg)
    assert "/somewhere" not in command and "--threads" not in command and "--no-progress" not in command
    again = T.parse_args(command.split()[3:])  # after "python -m skyrt_demo.train"
    expected = dataclasses.replace(cfg, out=again.out, dit_init="dit.pt", threads=again.threads, progress=again.progress)
    assert again == expected


def test_text_only_share_makes_crops_start_the_stream_without_context(tmp_path):
    latents = torch.zeros(6, 16, 13, 2, 2)
    data = T.LatentData(latents=latents, prompts=[W.EXAMPLE.prompt] * 6, second_prompts=[""] * 6,
                        switch_latent=np.full(6, -1), fg=torch.zeros(6, 13, 2, 2, dtype=torch.uint8))

    def picks(share: float) -> list[tuple[int, int]]:
        """(first latent, context blocks) of 200 crops of 4 blocks."""
        trainer = T.Trainer(T.parse_args(["--out", str(tmp_path), "--text-only-share", str(share)]))
        rng = np.random.default_rng(0)
        return [trainer._pick_crop(data, rng, crop=8, block=2)[1:3] for _ in range(200)]

    assert set(picks(1.0)) == {(0, 0)}  # (first latent, context blocks)
    assert len(set(picks(0.0))) > 1  # the ordinary mix: later starts and clean context too


def test_switch_crop_share_draws_switch_crops_conditioned_on_the_new_prompt(tmp_path):
    # Clips 0-1 switch at latent 6 to a second prompt, clips 2-5 do not.
    switch_at = np.array([6, 6, -1, -1, -1, -1])
    data = T.LatentData(latents=torch.zeros(6, 16, 13, 2, 2), prompts=[W.EXAMPLE.prompt] * 6,
                        second_prompts=["new"] * 2 + [""] * 4, switch_latent=switch_at,
                        fg=torch.zeros(6, 13, 2, 2, dtype=torch.uint8))

    def picks(share: float) -> list[tuple]:
        trainer = T.Trainer(T.parse_args(["--out", str(tmp_path), "--switch-crop-share", str(share)]))
        rng = np.random.default_rng(0)
        return [trainer._pick_crop(data, rng, crop=8, block=2) for _ in range(300)]

    for i, start, ctx, prompt in picks(1.0):  # every crop: old-prompt context up to the switch, then new blocks
        assert i in (0, 1) and prompt == "new" and start + 2 * ctx == 6 and 1 <= ctx <= 3
    ordinary = sum(p == "new" for *_, p in picks(0.0)) / 300
    assert 0.05 < ordinary < 0.5  # the ordinary mix draws some switch crops, far from all
    with pytest.raises(ValueError, match="switch-crop-share"):
        T.parse_args(["--out", str(tmp_path), "--switch-crop-share", "1.5"])


def test_grown_dit_computes_what_the_shallow_one_did_and_its_new_blocks_can_learn():
    torch.manual_seed(0)
    shallow_cfg = T.TrainConfig(dit_dim=32, dit_heads=2, dit_ffn=64, dit_layers=2, text_dim=16, freq_dim=16)
    shallow = T.WanDiT(shallow_cfg.dit_config()).eval()
    with torch.no_grad():  # trained-looking weights: nothing zero, so an identity block is not trivially given
        for param in shallow.parameters():
            param.add_(0.05 * torch.randn_like(param))
    deep = T.WanDiT(dataclasses.replace(shallow_cfg, dit_layers=6).dit_config()).eval()
    deep.load_state_dict(T.grown_dit_state(shallow.state_dict(), deep))
    x, t, ctx = torch.randn(2, 16, 4, 4, 4), torch.rand(2, 4) * 1000, torch.randn(2, shallow_cfg.text_len, 16)
    with torch.no_grad():
        want = shallow(x, t, ctx, causal_block_size=2)
    got = deep(x, t, ctx, causal_block_size=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().mean().backward()
    assert deep.blocks[1].ffn[2].weight.grad.abs().max() > 0  # a grown block is not stuck at the identity
    assert deep.blocks[1].self_attn.o.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="multiple"):
        T.grown_dit_state(shallow.state_dict(), T.WanDiT(dataclasses.replace(shallow_cfg, dit_layers=3).dit_config()))


def test_shape_outline_is_the_mask_minus_its_erosion_on_the_torus():
    fg = torch.zeros(1, 1, 8, 8)
    fg[0, 0, 2:6, 2:6] = 1  # a 4x4 square: its 12 border cells are outline, the 2x2 centre is not
    outline = T.shape_outline(fg)[0, 0]
    assert outline.sum() == 12 and outline[3:5, 3:5].sum() == 0 and outline[2, 2:6].sum() == 4
    full = torch.ones(1, 1, 8, 8)  # wraps all round: no edge anywhere
    assert T.shape_outline(full).sum() == 0


def test_outline_band_lies_on_the_true_outline():
    size = 64
    clip = W.render_clip(W.parse_prompt("a red square standing still on a black background"), 5, size, size, seed=1)
    band = T.shape_outline_band(clip, size)  # [T, S, S]
    cx, cy = clip.truth.centers[0]
    half_side = 0.9 * clip.truth.radius  # world.shape_sdf's square
    assert band.shape == (5, size, size) and band.min() >= 0
    assert band[0, int(cy), int(cx)] == 0  # the middle of the shape
    assert band[0, int(cy), int(cx + half_side)] > 0.5  # on its right edge
    assert band[0, int(cy), int((cx + size / 2) % size)] == 0  # the far side of the torus
    band_width = 2 * T.OUTLINE_BAND * half_side
    assert band[0].sum() == pytest.approx(4 * 2 * half_side * band_width, rel=0.1)  # four edges' worth


def test_decoder_phase_trains_the_decoder_alone_and_keeps_the_data(smoke_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(smoke_run[0], out)
    dit_step = torch.load(out / "checkpoints" / "dit.pt", weights_only=True)["step"]
    before = torch.load(out / "checkpoints" / "vae.pt", weights_only=True)["vae"]
    shards = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    cfg = T.parse_args(["--out", str(out), *SMOKE, "--resume", "--vae-decoder-steps", "4", "--vae-decoder-lr", "3e-3",
                        "--vae-edge-weight", "4", "--dit-steps", str(dit_step)])
    model_dir = T.Trainer(cfg).run()
    after = torch.load(out / "checkpoints" / "vae.pt", weights_only=True)["vae"]
    decoder_side = [k for k in before if k.startswith(("decoder.", "conv2."))]
    assert decoder_side and any(not torch.equal(before[k], after[k]) for k in decoder_side)
    for k in before.keys() - set(decoder_side):  # encoder and its fold: the latent space did not move
        assert torch.equal(before[k], after[k]), k
    assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == shards  # encoded data reused as is
    vae = json.loads((model_dir / T.META_NAME).read_text())["summary"]["vae"]
    assert [p["phase"] for p in vae["phases"]] == ["short", "long", "decoder"]
    assert vae["normalised_std"] == vae["phases"][1]["normalised_std"]  # the fold's statistics still hold
    assert "decoder-only steps" in (model_dir / T.CARD_NAME).read_text()


def test_saved_folder_is_the_official_layout(smoke_run):
    _, model_dir = smoke_run
    for name in ("config.json", "model.safetensors", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
                 "google/umt5-xxl/tokenizer.json", T.CARD_NAME, T.META_NAME):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_frame_per_block"] == 2 and config["dim"] == 128 and config["text_len"] == 32
    card = (model_dir / T.CARD_NAME).read_text()
    assert "flow-matching loss" in card and "--seed 0" in card
    # The sampling sweep (--eval-clips) ran and its best setting is the recommendation.
    meta = json.loads((model_dir / T.META_NAME).read_text())
    sweep = meta["summary"]["eval"]
    assert len(sweep["results"]) == len(T.SWEEP) and meta["recommended"] == sweep["best"]
    assert "| shift | guidance | adherence |" in card and meta["recommended"]["mode"] == "kvcache"
    assert sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) < T.MAX_MODEL_BYTES


def test_saved_folder_loads_and_generates(smoke_run):
    import skyrt

    _, model_dir = smoke_run
    pipe = skyrt.load(model_dir)
    assert pipe.model.num_frame_per_block == 2  # -> the pipeline picks block-causal attention
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a block-causal checkpoint: kvcache must not warn about approximation
        kv = pipe.generate(W.EXAMPLE.prompt, num_frames=13, height=64, width=64, num_inference_steps=2, shift=2.0,
                           guidance_scale=3.0, mode="kvcache", causal_block_size=2, seed=0, progress=False)
    win = pipe.generate(W.EXAMPLE.prompt, num_frames=13, height=64, width=64, num_inference_steps=2, shift=2.0,
                        guidance_scale=3.0, mode="window", causal_block_size=2, seed=0, progress=False)
    for frames in (kv, win):
        assert frames.shape == (13, 64, 64, 3) and frames.dtype == np.uint8
    # Block-causal training: kvcache equals window mode with causal attention and the same noise.
    assert np.abs(kv.astype(int) - win.astype(int)).mean() < 1.0
    stream = pipe.stream(W.EXAMPLE.prompt, mode="kvcache", ar_step=1, causal_block_size=2, sink_blocks=0,
                         window_blocks=2, overlap_history=13, height=64, width=64, num_inference_steps=2,
                         guidance_scale=1.0, seed=0, max_chunks=3)
    assert [len(c) for c in stream] == [5, 8, 8]


def test_resume_continues_and_refuses_to_overwrite(smoke_run):
    out, _ = smoke_run
    with pytest.raises(FileExistsError, match="--resume"):
        T.Trainer(T.parse_args(["--out", str(out), *SMOKE])).run()
    with pytest.raises(ValueError, match="dit_dim"):
        T.Trainer(T.parse_args(["--out", str(out), *SMOKE, "--resume", "--dit-dim", "64"])).run()
    before = len((out / "train_log.jsonl").read_text().splitlines())
    cfg = T.parse_args(["--out", str(out), *SMOKE, "--resume"])
    cfg.dit_steps = 15
    T.Trainer(cfg).run()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()[before:]]
    # The VAE and the data are reused; the DiT continues from its step-12 checkpoint to 15.
    assert [r["stage"] for r in log] == ["dit"] and log[-1]["step"] == 15
    assert torch.load(out / "checkpoints" / "dit.pt", weights_only=True)["step"] == 15


def test_old_shards_get_the_same_masks_from_a_replay(smoke_run):
    out, _ = smoke_run
    trainer = T.Trainer(T.parse_args(["--out", str(out), *SMOKE, "--resume"]))
    with np.load(trainer._shard_path(1)) as f:
        written = dict(f)
    np.savez(trainer._shard_path(1), **{k: v for k, v in written.items() if k != "fg"})  # a pre-mask shard
    replayed = trainer._load_shard(1)
    np.testing.assert_array_equal(replayed["fg"], written["fg"])
    with np.load(trainer._shard_path(1)) as f:
        assert "fg" in f.files  # written back: the replay runs once


def test_latent_fg_mask_follows_the_shape():
    size = 64
    attrs = W.parse_prompt("a red square moving right on a dark blue background, camera panning left")
    clip = W.render_clip(attrs, 17, size, size, seed=3)
    mask = T.latent_fg_mask(clip, size)  # [L, h, w]
    assert mask.shape == (5, size // 8, size // 8) and mask.dtype == np.uint8
    centers, r = clip.truth.centers, clip.truth.radius
    cell_centres = (np.arange(size // 8) + 0.5) * 8  # pixel coordinate of each latent cell's centre
    for latent in range(5):
        frames = [0] if latent == 0 else list(range(4 * latent - 3, 4 * latent + 1))
        for t in frames:  # the cell under the shape's centre is on, in every frame the latent covers
            cx, cy = centers[t]
            assert mask[latent, int(cy) // 8, int(cx) // 8] == 1, (latent, t)
        # Cells whose centre is farther than the grown shape's circumcircle (+ half a cell diagonal and a
        # pixel of anti-aliasing) from every centre of the group are off; a square of radius r has half-side
        # 0.9 r (world.shape_sdf), so circumradius 0.9 r sqrt(2).
        reach = 1.4 * 0.9 * r * np.sqrt(2) + 4 * np.sqrt(2) + 1
        near = np.zeros((size // 8, size // 8), bool)
        for t in frames:
            dx = np.abs(cell_centres - centers[t][0]); dx = np.minimum(dx, size - dx)  # torus
            dy = np.abs(cell_centres - centers[t][1]); dy = np.minimum(dy, size - dy)
            near |= np.hypot(dx[None, :], dy[:, None]) <= reach
        assert not mask[latent][~near].any(), latent
        assert 0 < mask[latent].mean() < 0.5


def test_tokenizer_holds_every_world_word(tmp_path):
    from skyrt.export.text_encoder import load_tokenizer

    tok = load_tokenizer(T.make_world_tokenizer(tmp_path / "tok"))
    for word in W.vocabulary():
        if word != ",":  # a lone comma gets the word-start marker; inside a prompt it is one piece
            assert len(tok.tokenize(word)) == 1, word
    ids = tok(W.EXAMPLE.prompt).input_ids
    assert ids[-1] == 1 and tok.unk_token_id not in ids and len(ids) == 14  # 13 words and commas + </s>
    assert tok.unk_token_id not in tok("A Fox 42!").input_ids  # other prompts fall back to characters


def test_encode_moments_and_latent_fold_are_exact():
    torch.manual_seed(0)
    vae = T.init_vae(WanVAE(VAEConfig(dim=8, num_res_blocks=1))).eval()
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        mu, log_var = vae.encode_moments(x)
        torch.testing.assert_close(mu, vae.encode(x), rtol=0, atol=0)
        before = vae.decode(mu)
        torch.testing.assert_close(vae.decode(mu, clamp=False).clamp(-1, 1), before, rtol=0, atol=0)
        scale, shift = torch.rand(16) + 0.5, torch.randn(16)
        T.fold_latent_affine(vae, scale, shift)
        mu2, log_var2 = vae.encode_moments(x)
        torch.testing.assert_close(mu2, mu * scale.view(1, -1, 1, 1, 1) + shift.view(1, -1, 1, 1, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(log_var2, log_var + 2 * torch.log(scale).view(1, -1, 1, 1, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.decode(mu2), before, rtol=1e-4, atol=1e-4)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of 16"):
        T.parse_args(["--out", str(tmp_path), "--size", "100"])
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        T.parse_args(["--out", str(tmp_path), "--clip-frames", "48"])
    with pytest.raises(ValueError, match="longer than"):
        T.parse_args(["--out", str(tmp_path), "--crop-frames", "20"])


def test_checkpoints_load_without_running_code(smoke_run, tmp_path):
    # Every .pt the trainer reads (its own, and a user's --dit-init) goes through weights_only loading:
    # the smoke run's checkpoint loads, a pickle naming any other global is refused with the file named.
    out, _ = smoke_run
    state = T.load_checkpoint(out / "checkpoints" / "dit.pt")
    assert "ema_dit" in state and isinstance(state["step"], int)
    crafted = tmp_path / "crafted.pt"
    torch.save({"ema_dit": {}, "payload": argparse.Namespace(run="anything")}, crafted)
    with pytest.raises(ValueError, match=r"crafted\.pt is not a skyrt training checkpoint"):
        T.load_checkpoint(crafted)
