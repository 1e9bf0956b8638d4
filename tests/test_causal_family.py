"""The causal Wan2.1 family (Self-Forcing, CausVid, LongLive, Causal-Forcing, Rolling-Forcing) against their
OWN inference loops.

skyrt runs them on its one rollout engine (runtime/kvcache.py driving skyrt._core.RolloutCore with the
core's fewstep sampler); tests/causal_rollout_reference.py, the host loop that ran them before, is kept as
a second oracle for runs longer than the fixtures.

The oracle: tests/fixtures/causal_family/*.npz, written once at development time by
tests/causal_family_reference.py, which ran each family's own pipeline code (their repos, their config
files, their checkpoint loading) on tiny random checkpoints written from the recipes in
recipes.json. Here skyrt loads the same checkpoints (regenerated from the recipes; `weights_sha256`
pins the bytes), replays the same noise draws and prompt embeddings, and must reproduce their latents
to 1e-4 (fp32). The umT5 encoder and the VAE are stood in for (their outputs are not part of these
fixtures; skyrt's are tested against transformers / diffusers elsewhere).

Rolling-Forcing's staggered window runs on the same core (the DF async schedule with ar_step 1 and
skyrt._core.RollingCache); its fixture is also checked against tests/rolling_forcing_reference.py, a
frozen restatement of their loop around skyrt's torch DiT reference, which the core must equal too.
"""
from __future__ import annotations

import gc
import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import skyrt
import causal_rollout_reference
from causal_checkpoints import (FIXTURES, dit_config, generator_weights, load_recipes, lora_weights, model_folders,
                                prompt_context, weights_digest, write_family_files)
from rolling_forcing_reference import Variant, rolling_forcing_latents
from skyrt.export.causal_checkpoint import load_causal_generator
from skyrt.export.checkpoint import CheckpointError
from skyrt.runtime import kvcache
from skyrt.runtime.backends.base import TextContext
from skyrt.runtime.causal_family import PRESETS, CausalFiles
from skyrt.runtime.causal_rollout import CausalSampling, FewStepSchedule, flow_match_grid

RECIPES = load_recipes()
TOLERANCE = 1e-4
# Recipes that run a family's released config unchanged (self_forcing_window adds local attention).
RELEASED_CONFIGS = ("self_forcing", "causvid", "longlive", "longlive_switch", "causal_forcing_framewise",
                    "causal_forcing_chunkwise", "rolling_forcing")
# Recipes of a family skyrt has a preset for (every recipe's family now).
PRESET_RECIPES = sorted(name for name, recipe in RECIPES.items() if recipe["family"] in PRESETS)


def fixture(name: str):
    return np.load(FIXTURES / f"{name}.npz")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One model folder per checkpoint layout (recipes sharing weights share a folder)."""
    return model_folders(RECIPES, tmp_path_factory)


def load_preset(folders, name: str, preset: str | None = None, **options):
    recipe = RECIPES[name]
    if recipe.get("lora"):
        options.setdefault("lora_alpha", recipe["lora"]["alpha"])
    return skyrt.load(folders[name], preset=preset or recipe["family"], **options)


class ReplayNoise(kvcache.NoiseSource):
    """Their draws, in their order: the initial noise tensor, then every torch.randn_like re-noise."""

    def __init__(self, data, steps: int):
        self.data, self.steps, self.next_draw = data, steps, 0

    def initial(self, block, shape):
        b = shape[1]
        return self.data["initial_noise"][:, block * b : (block + 1) * b].copy()

    def renoise(self, block, step, shape):
        if "renoise_block" in self.data:  # Rolling-Forcing: the fixture names each draw's block and next step
            expected = (int(self.data["renoise_block"][self.next_draw]), int(self.data["renoise_step"][self.next_draw]))
            assert (block, step + 1) == expected, f"re-noise of block {block} to step {step + 1}, theirs is {expected}"
        else:  # their loop draws once after every step but the last, block after block
            assert self.next_draw == block * (self.steps - 1) + step, "re-noise draws out of their order"
        draw = self.data["renoise"][self.next_draw]
        self.next_draw += 1
        return draw.copy()


@pytest.fixture
def their_inputs(monkeypatch):
    """Route a pipeline's noise and prompt embeddings to a fixture's (returns a function of the pipe)."""

    def apply(pipe, name: str):
        recipe, data = RECIPES[name], fixture(name)
        steps = len(recipe["sampling"]["denoising_step_list"])
        monkeypatch.setattr(kvcache, "NoiseSource", lambda *a, **k: ReplayNoise(data, steps))
        contexts = {f"prompt {i}": prompt_context(data[f"prompt_rows_{i}"], recipe["dit"]["text_len"])
                    for i in range(len(recipe["prompts"]))}
        monkeypatch.setattr(pipe.backend, "encode_text",
                            lambda prompt: TextContext(prompt, torch.from_numpy(contexts[prompt])[None]))
        return data

    return apply


@pytest.fixture
def rebases(monkeypatch) -> list[int]:
    """The shift of every cache rebase while the test runs, in order (the rollout core's ring, every
    prompt context at once)."""
    seen: list[int] = []
    real = kvcache.KVCache.rebase
    monkeypatch.setattr(kvcache.KVCache, "rebase", lambda self, shift: (seen.append(shift), real(self, shift))[1])
    return seen


def tiny_size(recipe) -> dict:
    return dict(height=recipe["latent"]["height"] * 8, width=recipe["latent"]["width"] * 8)


def ring_of(recipe) -> dict:
    """sink/window blocks of their cache (local attention), else the preset's ring (global attention)."""
    sampling = CausalSampling.from_config(**recipe["sampling"])
    if sampling.local_attn_size == -1:
        return {}
    ring = sampling.ring()
    return dict(sink_blocks=ring.sink_blocks, window_blocks=ring.window_blocks)


def run_like_theirs(pipe, name: str, recache: bool = True, **overrides) -> np.ndarray:
    """skyrt's latents for a fixture: generate(), or for a recipe with prompt switches, stream() with
    set_prompt at their switch frames (LongLive's interactive pipeline)."""
    recipe = RECIPES[name]
    frames = recipe["latent"]["frames"]
    kwargs = {**tiny_size(recipe), **ring_of(recipe), "output": "latent", "seed": 0, **overrides}
    if not recipe.get("switch_frames"):
        return pipe.generate("prompt 0", num_frames=1 + 4 * (frames - 1), progress=False, **kwargs)
    block = recipe["sampling"]["num_frame_per_block"]
    switch_at = {f // block: f"prompt {i + 1}" for i, f in enumerate(recipe["switch_frames"])}
    stream = pipe.stream("prompt 0", **kwargs)
    chunks = []
    for blk in range(frames // block):
        if blk in switch_at:
            stream.set_prompt(switch_at[blk], recache=recache)
        chunks.append(next(stream))
    stream.close()
    return np.concatenate(chunks, axis=1)


# ------------------------------------------------------------------------------------------ the oracle
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_regenerates_the_weights_their_loop_ran(name):
    assert weights_digest(RECIPES[name]) == RECIPES[name]["weights_sha256"]


@pytest.mark.parametrize("name", RELEASED_CONFIGS)
def test_preset_is_their_released_config(name):
    # recipe["sampling"] was read off their config files by their own code at reference time.
    recipe = RECIPES[name]
    assert PRESETS[recipe["family"]].sampling == CausalSampling.from_config(**recipe["sampling"])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_schedule_is_their_scheduler(name):
    recipe, data = RECIPES[name], fixture(name)
    sampling = CausalSampling.from_config(**recipe["sampling"])
    sigmas, timesteps = flow_match_grid(sampling.timestep_shift)
    assert np.array_equal(sigmas, data["grid_sigmas"]) and np.array_equal(timesteps, data["grid_timesteps"])
    assert np.array_equal(FewStepSchedule.from_sampling(sampling).timesteps, data["step_timesteps"].astype(np.float32))


@pytest.mark.parametrize("name", PRESET_RECIPES)
def test_latents_equal_their_inference_loop(folders, their_inputs, name):
    pipe = load_preset(folders, name)
    data = their_inputs(pipe, name)
    ours = run_like_theirs(pipe, name)
    ref = data["latents"]
    err = np.abs(ours - ref).max()
    print(f"{name}: {ref.shape[1]} latent frames, max |skyrt - theirs| = {err:.2e} (values up to {np.abs(ref).max():.1f})")
    assert ours.shape == ref.shape
    assert err <= TOLERANCE


@pytest.mark.parametrize("name, change", [
    ("self_forcing_window", dict(sink_blocks=1, window_blocks=5)),  # global-attention ring instead of theirs
    ("longlive", dict(sink_blocks=0, window_blocks=3)),  # no sink
    ("longlive_switch", dict(recache=False)),  # a switch without LongLive's recache
    ("self_forcing", dict(use_ema=False)),  # the 'generator' entry instead of --use_ema's
    ("causal_forcing_framewise", dict(sink_blocks=1, window_blocks=5)),  # a 7-frame ring: their cache holds 21
])
def test_fixtures_tell_the_semantics_apart(folders, their_inputs, name, change):
    """Each fixture fails a skyrt that got one of the settings wrong (the oracle has teeth)."""
    change = dict(change)
    load_options = {"use_ema": change.pop("use_ema")} if "use_ema" in change else {}
    pipe = load_preset(folders, name, **load_options)
    data = their_inputs(pipe, name)
    ours = run_like_theirs(pipe, name, **change)
    err = np.abs(ours - data["latents"]).max()
    print(f"{name} with {change}: max |skyrt - theirs| = {err:.2e}")
    assert err > 30 * TOLERANCE


def test_rope_rebase_is_exact(folders, their_inputs, monkeypatch, rebases):
    """Past the RoPE table skyrt rebases the cache; relative positions, hence outputs, stay the same.
    A table shrunk to 13 positions rebases the longlive fixture's stream at each of its last 3 blocks."""
    pipe = load_preset(folders, "longlive")
    data = their_inputs(pipe, "longlive")
    monkeypatch.setattr(kvcache, "ROPE_TABLE", 13)
    ours = run_like_theirs(pipe, "longlive")
    assert len(rebases) == 3
    assert np.abs(ours - data["latents"]).max() <= TOLERANCE


def test_recache_across_rebases_is_exact(folders, monkeypatch, rebases):
    """Prompt switches with recache on a stream that rebases at every block from the fourth on (a
    10-position table, no sink) equal the same stream with the real table."""
    pipe = load_preset(folders, "self_forcing")
    contexts = {p: torch.from_numpy(np.random.default_rng(i).standard_normal((1, 512, 32), dtype=np.float32))
                for i, p in enumerate(("a", "b", "c"))}
    monkeypatch.setattr(pipe.backend, "encode_text", lambda prompt: TextContext(prompt, contexts[prompt]))

    def run():
        stream = pipe.stream("a", height=32, width=48, output="latent", seed=4, sink_blocks=0, window_blocks=2)
        chunks = []
        for blk in range(10):
            if blk in (5, 8):
                stream.set_prompt("b" if blk == 5 else "c", recache=True)
            chunks.append(next(stream))
        stream.close()
        return np.concatenate(chunks, axis=1)

    reference = run()
    assert not rebases  # 30 frames: far from the real table
    monkeypatch.setattr(kvcache, "ROPE_TABLE", 10)
    shrunk = run()
    assert len(rebases) == 7
    assert np.abs(shrunk - reference).max() <= TOLERANCE


def random_contexts(monkeypatch, pipe) -> dict:
    """encode_text -> a seeded random context per distinct prompt (the umT5 stand-in)."""
    contexts: dict = {}

    def encode(prompt):
        if prompt not in contexts:
            rng = np.random.default_rng(len(contexts))
            contexts[prompt] = torch.from_numpy(rng.standard_normal((1, 512, 32), dtype=np.float32))
        return TextContext(prompt, contexts[prompt])

    monkeypatch.setattr(pipe.backend, "encode_text", encode)
    return contexts


@pytest.mark.parametrize("name, guidance", [("longlive", 1.0), ("self_forcing", 3.0)])
def test_core_equals_the_host_loop_oracle(folders, monkeypatch, rebases, name, guidance):
    """The rollout core against the host loop it replaced (tests/causal_rollout_reference.py) on a run
    longer than any fixture: 14 blocks through a ring of 1 + 2 (evictions from block 3 on), a RoPE table
    shrunk to 16 positions (a rebase at every other block from the sixth on), two prompt switches with LongLive's
    recache (one while the chunk starts at frame 0, one past it), with and without guidance."""
    pipe = load_preset(folders, name)
    random_contexts(monkeypatch, pipe)
    monkeypatch.setattr(kvcache, "ROPE_TABLE", 16)
    size, ring, blocks, switches = dict(height=32, width=48), dict(sink_blocks=1, window_blocks=2), 14, {3: "b", 9: "c"}
    stream = pipe.stream("a", negative_prompt="n", guidance_scale=guidance, output="latent", seed=5, **size, **ring)
    ours = []
    for blk in range(blocks):
        if blk in switches:
            stream.set_prompt(switches[blk], recache=True)
        ours.append(next(stream))
    stream.close()
    core_rebases, rebases[:] = list(rebases), []

    encode = pipe.backend.encode_text
    uncond = encode("n") if guidance > 1 else None
    sampling = pipe.preset.sampling
    oracle = causal_rollout_reference.CausalRollout(
        pipe.backend, sampling, encode("a"), uncond, guidance, (4, 6), kvcache.KVSettings(**ring),
        causal_rollout_reference.NoiseSource(np.random.default_rng(5)), shift=sampling.timestep_shift)
    theirs = []
    for blk in range(blocks):
        if blk in switches:
            oracle.set_prompt(encode(switches[blk]), uncond, recache=True)
        theirs.append(oracle.next())
    err = np.abs(np.concatenate(ours, axis=1) - np.concatenate(theirs, axis=1)).max()
    print(f"{name}, guidance {guidance}: {blocks} blocks, {len(core_rebases)} rebases, max |core - host loop| = {err:.2e}")
    assert core_rebases == [6] * 5
    assert err <= TOLERANCE


def test_guidance_combines_cond_and_uncond(folders, monkeypatch):
    """No family uses classifier-free guidance, but a preset pipeline takes it (cond and uncond caches)."""
    pipe = load_preset(folders, "self_forcing")
    contexts = {p: torch.from_numpy(np.random.default_rng(i).standard_normal((1, 512, 32), dtype=np.float32))
                for i, p in enumerate(("cat", "", "dog"))}
    monkeypatch.setattr(pipe.backend, "encode_text", lambda prompt: TextContext(prompt, contexts[prompt]))
    size = tiny_size(RECIPES["self_forcing"])
    one = dict(num_frames=9, output="latent", seed=1, progress=False, **size)
    cond = pipe.generate("cat", **one)
    uncond = pipe.generate("", **one)
    # guidance_scale <= 1 is no guidance (the official rule): the negative prompt is not even encoded
    assert np.abs(pipe.generate("cat", guidance_scale=1.0, negative_prompt="dog", **one) - cond).max() == 0
    guided = pipe.generate("cat", guidance_scale=2.0, **one)
    other = pipe.generate("cat", guidance_scale=2.0, negative_prompt="dog", **one)
    assert np.abs(guided - cond).max() > 1e-2 and np.abs(guided - other).max() > 1e-2
    assert np.abs(uncond - cond).max() > 1e-2


# ------------------------------------------------------------------------------------------ Rolling-Forcing
@pytest.fixture(scope="module")
def rolling_dit(folders):
    """The rolling_forcing fixture's DiT, read by skyrt's loader from their layout (--use_ema: the EMA entry
    under model._fsdp_wrapped_module. keys, beside a 'generator' entry of other weights)."""
    recipe = RECIPES["rolling_forcing"]
    folder = folders["rolling_forcing"]
    files = CausalFiles("rolling-forcing", folder / recipe["checkpoint"]["file"], use_ema=True,
                        config_json=json.loads((folder / "config.json").read_text()))
    return load_causal_generator(files)


def rolling_context():
    data = fixture("rolling_forcing")
    return data, prompt_context(data["prompt_rows_0"], RECIPES["rolling_forcing"]["dit"]["text_len"])


def test_rolling_forcing_restatement_equals_their_loop(rolling_dit):
    """Their staggered rolling window (5 blocks at 5 noise levels per DiT call, the sink re-rotated in front
    of each window, a 24-frame cache that evicts and a clean pass that loses the sink), restated around
    skyrt's torch DiT reference, reproduces their latents."""
    data, context = rolling_context()
    ours = rolling_forcing_latents(rolling_dit, context, data)
    ref = data["latents"]
    err = np.abs(ours - ref).max()
    print(f"rolling_forcing: {ref.shape[1]} latent frames, max |restatement - theirs| = {err:.2e} "
          f"(values up to {np.abs(ref).max():.1f})")
    assert ours.shape == ref.shape
    assert err <= TOLERANCE


def test_rolling_forcing_ema_entry_is_what_loads(rolling_dit):
    expected = generator_weights(RECIPES["rolling_forcing"], "generator_ema")
    assert all(torch.equal(rolling_dit.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("variant, factor", [
    (Variant(sink_follows_window=False), 30),  # the sink's keys left at frames 0..2
    (Variant(window_attention="block-causal"), 30),  # a causal mask inside the window
    # The clean pass keeping the sink once the cache holds 8 blocks changes only what blocks 7-10 cache (the
    # sink is 1 of 8 blocks of keys there), read by blocks 8-10 alone: measured 1.1e-3, a smaller difference.
    (Variant(clean_pass_loses_sink=False), 10),
])
def test_rolling_forcing_fixture_tells_the_semantics_apart(rolling_dit, variant, factor):
    data, context = rolling_context()
    err = np.abs(rolling_forcing_latents(rolling_dit, context, data, variant) - data["latents"]).max()
    print(f"rolling_forcing with {variant}: max |restatement - theirs| = {err:.2e}")
    assert err > factor * TOLERANCE


def rolling_run(folders, their_inputs, **overrides) -> np.ndarray:
    """The rolling-forcing preset's rollout of the fixture (their draws, their prompt embedding) on the core."""
    pipe = load_preset(folders, "rolling_forcing")
    their_inputs(pipe, "rolling_forcing")
    return run_like_theirs(pipe, "rolling_forcing", **overrides)


def test_rolling_forcing_core_equals_their_loop_and_the_restatement(folders, their_inputs, rolling_dit):
    """The rolling-forcing preset on the rollout core (DF async schedule with ar_step 1, the fewstep sampler,
    skyrt._core.RollingCache) equals their latents and the frozen restatement of their loop."""
    ours = rolling_run(folders, their_inputs)
    data, context = rolling_context()
    restated = rolling_forcing_latents(rolling_dit, context, data)
    err_theirs, err_restated = np.abs(ours - data["latents"]).max(), np.abs(ours - restated).max()
    print(f"rolling_forcing on the core: max |core - theirs| = {err_theirs:.2e}, "
          f"max |core - restatement| = {err_restated:.2e}")
    assert ours.shape == data["latents"].shape
    assert err_theirs <= TOLERANCE and err_restated <= TOLERANCE


def test_rolling_forcing_cache_is_their_codes():
    # code_constants were read off their self-attention module at reference time (scaled back to frames).
    constants = RECIPES["rolling_forcing"]["code_constants"]
    preset = PRESETS["rolling-forcing"]
    assert preset.rolling_cache == (constants["max_attention_size_frames"], constants["kv_cache_frames"])
    assert constants["block_length_frames"] == preset.sampling.causal_block_size
    # the ring holds their cache but the block its clean pass writes
    assert preset.ring.sink_blocks + preset.ring.window_blocks + 1 == constants["kv_cache_frames"] // 3


@pytest.mark.parametrize("frames, match", [((20, 24), "whole blocks of 3"), ((3, 24), "plus one block"),
                                           ((21, 18), "at least that long")])
def test_rolling_cache_refuses_what_it_cannot_keep(frames, match):
    core = kvcache._core.RolloutCore([1000, 500], [0.9, 0.5, 0.0], sampler="fewstep", renoise_sigmas=[0.0, 0.5],
                                     ar_step=1, causal_block_size=3, max_blocks_in_flight=2, height=4, width=6,
                                     tokens_per_frame=6, layers=1, heads=1, head_dim=12)
    with pytest.raises(ValueError, match=match):
        kvcache._core.RollingCache(core, *frames)
    core.close()


def test_rolling_forcing_schedule_is_their_window(folders):
    """Row w of the core's schedule for the preset is their window w: blocks max(0, w - L + 1) .. min(N - 1, w),
    block j at step w - j (its warped timestep), every block re-noised after each step but its last, block s
    finished (and committed: their clean pass) in the row where it is the window's oldest at its last step."""
    pipe = load_preset(folders, "rolling_forcing")
    recipe, data = RECIPES["rolling_forcing"], fixture("rolling_forcing")
    L, N = len(recipe["sampling"]["denoising_step_list"]), recipe["latent"]["frames"] // 3
    sampling = pipe._causal_rollout(pipe.resolve({"prompt": "x"}).request)
    core = kvcache._core.RolloutCore(
        list(sampling.step_template), list(sampling.sigmas), sampler=sampling.sampler,
        step_timesteps=list(sampling.step_timesteps), renoise_sigmas=list(sampling.renoise_sigmas),
        ar_step=sampling.ar_step, causal_block_size=3, max_blocks_in_flight=L, horizon_blocks=N, sink_blocks=1,
        window_blocks=6, height=4, width=6, tokens_per_frame=6, layers=1, heads=1, head_dim=12)
    noise = np.zeros((16, 3, 4, 6), np.float32)
    for w in range(N + L - 1):
        plan = core.next_row()
        blocks = list(range(max(0, w - L + 1), min(N - 1, w) + 1))
        assert plan.active == blocks
        assert np.array_equal(np.float32(plan.timesteps), data["step_timesteps"][[w - j for j in blocks]])
        assert plan.step_noise == [j for j in blocks if w - j < L - 1]
        assert plan.finished == ([w - L + 1] if w >= L - 1 else [])
        for blk in plan.started:
            core.start_block(blk, noise)
        core.pack_active()
        for blk in plan.step_noise:
            core.set_step_noise(blk, noise)
        core.apply_velocity()
        for blk in plan.finished:
            core.finish_block(blk)
            core.pack_store(core.next_slot())
            core.commit(blk, 0.0)
    assert core.next_row() is None
    core.close()


def _sink_left_at_frame_zero(real_view):
    """A rollout whose sink keys stay at frames 0..2 (the view's slots, the sink rotated back to 0 for the call)."""
    def view(self, first, count, commit=False):
        keys = self.core.buffer("cache_k").numpy()  # [layers, B, slots * tokens, heads, head_dim], slot 0 the sink
        sink = keys[:, :, : self.block * self.core.buffer("new_k", 1).numpy().shape[2]]
        kvcache._core.kv_rope_rebase(sink, -self.rolling.sink_frame)  # back where the policy left it
        out = real_view(self, first, count, commit)
        kvcache._core.kv_rope_rebase(sink, self.rolling.sink_frame)  # and to frame 0 for this call
        return out
    return view


def _clean_pass_keeps_the_sink(real_view):
    """A rollout whose clean pass sees the sink (at frames 0..2) however full their cache is."""
    def view(self, first, count, commit=False):
        keys = self.core.buffer("cache_k").numpy()
        sink = keys[:, :, : self.block * self.core.buffer("new_k", 1).numpy().shape[2]]
        if getattr(self, "sink_moved", False):  # back where the policy left it
            kvcache._core.kv_rope_rebase(sink, -self.rolling.sink_frame)
            self.sink_moved = False
        valid, attention = real_view(self, first, count, commit)
        if commit and first >= 1 and not valid[0]:
            valid = valid.copy()
            valid[0] = True
            kvcache._core.kv_rope_rebase(sink, self.rolling.sink_frame)  # to frame 0 for this pass
            self.sink_moved = True
        return valid, attention
    return view


@pytest.mark.parametrize("change, factor", [("sink at frame 0", 30), ("block-causal window", 30),
                                            ("ring of sink 1 + window 3", 30),
                                            # blocks 7-10's cache only, read by blocks 8-10 (as the restatement's)
                                            ("clean pass keeps the sink", 10)])
def test_rolling_forcing_fixture_tells_the_core_semantics_apart(folders, their_inputs, monkeypatch, change, factor):
    """The fixture fails a core run that got one part of their policy wrong (the oracle has teeth)."""
    overrides = {}
    real_view = kvcache.KVRollout._view
    if change == "sink at frame 0":
        monkeypatch.setattr(kvcache.KVRollout, "_view", _sink_left_at_frame_zero(real_view))
    elif change == "clean pass keeps the sink":
        monkeypatch.setattr(kvcache.KVRollout, "_view", _clean_pass_keeps_the_sink(real_view))
    elif change == "block-causal window":
        monkeypatch.setattr(kvcache.KVRollout, "_view",
                            lambda self, first, count, commit=False: (real_view(self, first, count, commit)[0], None))
    else:  # a smaller ring than their 24-frame cache: the oldest working blocks drop out
        overrides = dict(sink_blocks=1, window_blocks=3)
    err = np.abs(rolling_run(folders, their_inputs, **overrides) - fixture("rolling_forcing")["latents"]).max()
    print(f"rolling_forcing on the core with {change}: max |core - theirs| = {err:.2e}")
    assert err > factor * TOLERANCE


def rolling_stream(pipe, blocks: int, switch: tuple[int, str, bool] | None = None) -> np.ndarray:
    """`blocks` blocks of a rolling-forcing stream of prompt "a" (seeded noise), optionally switching the
    prompt (at block, to prompt, recache) on the way."""
    stream = pipe.stream("a", height=32, width=48, output="latent", seed=3)
    chunks = []
    for blk in range(blocks):
        if switch is not None and blk == switch[0]:
            stream.set_prompt(switch[1], recache=switch[2])
        chunks.append(next(stream))
    stream.close()
    return np.concatenate(chunks, axis=1)


def test_rolling_forcing_rope_rebase_is_exact(folders, monkeypatch, rebases):
    """Past the RoPE table the rolling stream rebases its cache; relative positions, hence outputs, stay the
    same (the sink's placement follows the origin). 20 blocks with a 40-position table (the least its ring and
    window allow) against the real table."""
    pipe = load_preset(folders, "rolling_forcing")
    random_contexts(monkeypatch, pipe)
    reference = rolling_stream(pipe, 20)
    assert not rebases
    monkeypatch.setattr(kvcache, "ROPE_TABLE", 40)
    shrunk = rolling_stream(pipe, 20)
    err = np.abs(shrunk - reference).max()
    print(f"rolling_forcing, 20 blocks, {len(rebases)} rebases: max |rebased - not| = {err:.2e}")
    assert len(rebases) >= 5 and err <= TOLERANCE


def test_rolling_forcing_recache_under_the_same_prompt_changes_nothing(folders, monkeypatch):
    """A recache re-runs each cached block's clean pass with its own view: under the same prompt, while the
    ring holds every block, the cache and so the stream stay what they were; another prompt changes them."""
    pipe = load_preset(folders, "rolling_forcing")
    random_contexts(monkeypatch, pipe)
    reference = rolling_stream(pipe, 9)
    same = rolling_stream(pipe, 9, switch=(4, "a", True))
    other, soft = rolling_stream(pipe, 9, switch=(4, "b", True)), rolling_stream(pipe, 9, switch=(4, "b", False))
    err = np.abs(same - reference).max()
    print(f"rolling_forcing: recache under the same prompt, max |recached - not| = {err:.2e}; "
          f"another prompt with recache vs without: {np.abs(other - soft).max():.2e}")
    assert err <= TOLERANCE
    # measured 3.0e-3 and more: the tiny model's prompts differ little
    assert np.abs(other - soft).max() > 10 * TOLERANCE and np.abs(soft - reference).max() > 10 * TOLERANCE


# ------------------------------------------------------------------------------------------ loading
def test_causal_forcing_ema_with_fsdp_keys_loads(folders):
    """Causal-Forcing's frame-wise file: 'generator_ema' alone, keyed model._fsdp_wrapped_module.*."""
    recipe = RECIPES["causal_forcing_framewise"]
    saved = torch.load(folders["causal_forcing_framewise"] / recipe["checkpoint"]["file"], weights_only=True)
    assert list(saved) == ["generator_ema"]
    assert all(k.startswith("model._fsdp_wrapped_module.") for k in saved["generator_ema"])
    dit = load_preset(folders, "causal_forcing_framewise").backend.dit
    expected = generator_weights(recipe, "generator_ema")
    assert all(torch.equal(dit.state_dict()[k], v) for k, v in expected.items())


def test_ema_only_file_without_use_ema_is_refused(folders):
    # The frame-wise release under the chunk-wise preset (which reads 'generator', as their README runs it).
    path = folders["causal_forcing_framewise"] / RECIPES["causal_forcing_framewise"]["checkpoint"]["file"]
    with pytest.raises(CheckpointError, match="only 'generator_ema'") as err:
        load_preset(folders, "causal_forcing_chunkwise", checkpoint=path)
    assert str(path) in str(err.value) and "use_ema=True" in str(err.value)


def test_fsdp_flat_parameters_are_refused(folders, tmp_path):
    flat = tmp_path / "sharded.pt"
    torch.save({"generator_ema": {"model._fsdp_wrapped_module._flat_param": torch.zeros(10)}}, flat)
    with pytest.raises(CheckpointError, match="flat parameters") as err:
        load_preset(folders, "causal_forcing_framewise", checkpoint=flat)
    assert str(flat) in str(err.value)


def test_ema_missing_a_key_is_refused(folders, tmp_path):
    # Their inference.py loads this layout with strict=False: a missing key would keep the base weights.
    recipe = RECIPES["causal_forcing_framewise"]
    state = {f"model._fsdp_wrapped_module.{k}": v for k, v in generator_weights(recipe, "generator_ema").items()}
    del state["model._fsdp_wrapped_module.blocks.1.ffn.2.weight"]
    partial = tmp_path / "partial.pt"
    torch.save({"generator_ema": state}, partial)
    with pytest.raises(CheckpointError, match="blocks.1.ffn.2.weight") as err:
        load_preset(folders, "causal_forcing_framewise", checkpoint=partial)
    assert str(partial) in str(err.value)


def test_use_ema_reads_generator_ema(folders):
    recipe = RECIPES["self_forcing"]
    for use_ema, entry in ((None, "generator_ema"), (False, "generator")):  # the preset's default is --use_ema
        options = {} if use_ema is None else {"use_ema": use_ema}
        dit = load_preset(folders, "self_forcing", **options).backend.dit
        expected = generator_weights(recipe, entry)
        assert all(torch.equal(dit.state_dict()[k], v) for k, v in expected.items()), entry


def test_lora_is_merged_into_the_base(folders):
    # peft computes x W^T + (alpha / r) (x A^T) B^T; merged, W + (alpha / r) B A.
    recipe = RECIPES["longlive"]
    dit = load_preset(folders, "longlive").backend.dit
    base, lora = generator_weights(recipe, "generator"), lora_weights(recipe)
    scale = recipe["lora"]["alpha"] / recipe["lora"]["rank"]
    for module, (a, b) in lora.items():
        torch.testing.assert_close(dit.state_dict()[f"{module}.weight"], base[f"{module}.weight"] + scale * b @ a)
    untouched = "blocks.0.self_attn.norm_q.weight"
    assert torch.equal(dit.state_dict()[untouched], base[untouched])


def test_config_from_shapes_when_the_folder_has_no_config_json(tmp_path):
    # A 1.3B-shaped checkpoint (dim 1536) would be 12 heads of 128; this tiny one's dim 32 is ambiguous.
    recipe = RECIPES["causvid"]
    write_family_files(recipe, tmp_path)
    with pytest.raises(CheckpointError, match="ambiguous"):
        skyrt.load(tmp_path, preset="causvid")
    from skyrt.export.causal_checkpoint import infer_dit_config

    state = generator_weights(recipe, "generator")
    config = infer_dit_config(state, "x", {"dim": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 2})
    assert (config.num_heads, config.ffn_dim) == (2, 64)
    wide = dict(state, **{"patch_embedding.weight": torch.zeros(256, 16, 1, 2, 2)})  # dim 256 = 2 heads of 128
    config = infer_dit_config(wide, "x")
    assert (config.dim, config.num_heads, config.num_layers, config.ffn_dim, config.freq_dim, config.text_dim) == (
        256, 2, 2, 64, 32, 32)


# ------------------------------------------------------------------------------------------ bad input
def test_bidirectional_folder_with_a_causal_preset_is_refused(official_dir):
    with pytest.raises(FileNotFoundError, match="bidirectional") as err:
        skyrt.load(official_dir, preset="self-forcing")
    assert str(official_dir) in str(err.value) and "self_forcing_dmd.pt" in str(err.value)
    shards = sorted(official_dir.glob("*.safetensors"))
    with pytest.raises(ValueError, match="bidirectional"):
        skyrt.load(official_dir, preset="self-forcing", checkpoint=shards[0])


def test_bare_state_dict_is_refused(folders, tmp_path):
    # A Wan2.1 DiT saved as a bare state dict (what a bidirectional .pth looks like): no 'generator'.
    bare = tmp_path / "wan.pt"
    torch.save(generator_weights(RECIPES["causvid"], "generator"), bare)
    with pytest.raises(CheckpointError, match="bare state dict") as err:
        load_preset(folders, "causvid", checkpoint=bare)
    assert str(bare) in str(err.value)


def test_truncated_checkpoint_is_refused(folders, tmp_path):
    good = folders["causvid"] / RECIPES["causvid"]["checkpoint"]["file"]
    cut = tmp_path / "model.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_preset(folders, "causvid", checkpoint=cut)
    assert str(cut) in str(err.value)


class _Payload:
    """A pickled call to os.system: what a malicious checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("extra, global_name", [("code", "system"), ("numpy", "numpy")])
def test_pickle_with_a_non_tensor_global_is_refused_without_running_it(folders, tmp_path, extra, global_name):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    state = {f"model.{k}": v for k, v in generator_weights(RECIPES["causvid"], "generator").items()}
    torch.save({"generator": state, "extra": _Payload(marker) if extra == "code" else np.int64(3)}, evil)
    with pytest.raises(CheckpointError, match=global_name) as err:
        load_preset(folders, "causvid", checkpoint=evil)
    assert str(evil) in str(err.value) and "not tensor data" in str(err.value)
    assert not marker.exists()


def test_parameters_and_training_state_load(folders, tmp_path):
    # torch.save of nn.Parameters, optimizer-like entries, ints: all within torch's weights-only set.
    state = {f"model.{k}": torch.nn.Parameter(v) for k, v in generator_weights(RECIPES["causvid"], "generator").items()}
    path = tmp_path / "params.pt"
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                 "param_groups": [{"lr": 2e-6, "betas": (0.0, 0.999), "params": [0]}]}
    torch.save({"generator": state, "generator_optimizer": optimizer, "step": 3}, path)
    load_preset(folders, "causvid", checkpoint=path)


def test_lora_for_another_base_is_refused(folders, tmp_path):
    recipe = dict(RECIPES["longlive"], dit=dict(RECIPES["longlive"]["dit"], dim=48, num_heads=3))
    paths = write_family_files(recipe, tmp_path)
    with pytest.raises(CheckpointError, match="another base") as err:
        load_preset(folders, "longlive", lora=paths["lora"])
    assert str(paths["lora"]) in str(err.value)
    stray = tmp_path / "stray.pt"
    torch.save({"generator_lora": {"base_model.model.blocks.7.self_attn.q.lora_A.weight": torch.zeros(4, 32),
                                   "base_model.model.blocks.7.self_attn.q.lora_B.weight": torch.zeros(32, 4)}}, stray)
    with pytest.raises(CheckpointError, match="does not have"):
        load_preset(folders, "longlive", lora=stray)


def test_lora_alpha_must_match_its_rank(folders):
    # The preset's alpha 256 is for rank 256 (their config); the tiny LoRA has rank 4.
    with pytest.raises(ValueError, match="lora_alpha"):
        skyrt.load(folders["longlive"], preset="longlive")


def test_missing_ema_entry_is_refused(folders):
    with pytest.raises(CheckpointError, match="generator_ema"):
        load_preset(folders, "causvid", use_ema=True)


def test_preset_settings_that_do_not_apply_are_refused(folders):
    pipe = load_preset(folders, "self_forcing")
    size = tiny_size(RECIPES["self_forcing"])
    with pytest.raises(ValueError, match="distilled for 4 steps"):
        pipe.generate("x", num_frames=9, num_inference_steps=8, **size)
    with pytest.raises(ValueError, match="end_image"):  # an image start: tests/test_stream_start.py
        pipe.generate("x", num_frames=9, end_image=np.zeros((32, 48, 3), np.uint8), **size)
    with pytest.raises(ValueError, match="unknown preset"):
        skyrt.load(folders["self_forcing"], preset="self-forcin")
    # onnxruntime runs a preset from its export (tests/test_preset_export.py), never its model folder
    with pytest.raises(ValueError, match="skyrt export onnx --preset self-forcing"):
        skyrt.load(folders["self_forcing"], preset="self-forcing", backend="onnxruntime")


def test_preset_defaults_fill_only_unset_arguments(folders):
    # What generate("x", width=48, seed=3) resolves to (explicit values equal to a default: test_request_resolution.py).
    pipe = load_preset(folders, "longlive")
    req = pipe.resolve({"prompt": "x", "width": 48, "seed": 3}).request
    assert (req.mode, req.num_inference_steps, req.guidance_scale, req.causal_block_size) == ("kvcache", 4, 1.0, 3)
    assert (req.sink_blocks, req.window_blocks, req.height, req.width, req.fps) == (1, 2, 480, 48, 16)


# ------------------------------------------------------------------------------------------ endless
@pytest.fixture
def one_torch_thread():
    """Ops on tiny tensors run faster on one thread; with two, a busy machine makes every op wait for
    the second thread (measured here: 0.07 s a block on one thread, 0.3 s on two with other jobs running)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_endless_stream_past_the_rope_table_with_flat_memory(folders, rebases, one_torch_thread):
    """1,500 latent frames (500 blocks) of a Self-Forcing-layout model, 16 x 16 latents: positions pass
    the 1024-entry RoPE table (their code stops there; skyrt rebases) and memory stays flat."""
    import psutil
    import tracemalloc

    pipe = load_preset(folders, "self_forcing")
    stream = pipe.stream("a red circle", height=128, width=128, output="latent", seed=0, max_chunks=500)
    process, frames, rss, heap = psutil.Process(), 0, {}, 0
    for index, block in enumerate(stream):
        frames += block.shape[1]
        assert np.isfinite(block).all()
        if index == 100:  # warmed up: every buffer allocated, the ring full
            gc.collect()
            rss[100] = process.memory_info().rss
            tracemalloc.start()
    gc.collect()
    heap = tracemalloc.get_traced_memory()[0]  # Python-side allocations still alive after 400 blocks
    tracemalloc.stop()
    rss[499] = process.memory_info().rss
    assert frames == 1500 and rebases, "the stream must pass the RoPE table"
    growth_mb = (rss[499] - rss[100]) / 2**20
    print(f"1500 latent frames, {len(rebases)} rebases, RSS {rss[100] / 2**20:.0f} -> {rss[499] / 2**20:.0f} MiB, "
          f"traced heap still alive {heap / 2**20:.2f} MiB after 400 blocks")
    assert heap < 2 * 2**20  # nothing accumulates per block (one block's latents are 48 KiB)
    assert growth_mb < 30


# ------------------------------------------------------------------------------------------ CLI
def test_cli_generate_and_serve_take_a_preset(folders, tmp_path, monkeypatch):
    from skyrt.runtime import cli

    out = tmp_path / "out.mp4"
    model = folders["self_forcing"]
    assert cli.main(["generate", "--model", str(model), "--preset", "self-forcing", "--height", "32", "--width", "48",
                     "--num-frames", "9", "--no-progress", "--output", str(out)]) == 0
    assert out.stat().st_size > 0
    seen = {}
    monkeypatch.setattr("skyrt.runtime.server.serve", lambda spec, sampling, config, **kw: seen.update(
        spec=spec, sampling=sampling, config=config))
    assert cli.main(["serve", "--model", str(model), "--preset", "self-forcing", "--no-token"]) == 0
    assert seen["spec"].options == {"preset": "self-forcing"} and seen["sampling"].user == {}
    # The server resolves the stream against the loaded model: the preset's settings over serve's own.
    server_fps = seen["config"].fps  # None: the request's
    resolution = load_preset(folders, "self_forcing").resolve(
        replace(seen["sampling"], user={"prompt": "x"}), stream=True)
    expected = PRESETS["self-forcing"].sampling_defaults()
    assert server_fps is None and resolution.request.fps == 16
    assert {k: getattr(resolution.request, k) for k in ("mode", "num_inference_steps", "height", "width",
                                                         "guidance_scale")} == {
        k: expected[k] for k in ("mode", "num_inference_steps", "height", "width", "guidance_scale")}
    for flags in (["--steps", "30"], ["--mode", "window"]):  # flags the preset's checkpoint cannot honour
        assert cli.main(["generate", "--model", str(model), "--preset", "self-forcing", *flags, "--height", "32",
                         "--width", "48", "--num-frames", "9", "--output", str(out)]) == 2


def test_speed_benchmark_runs_its_tiny_shape(tmp_path):
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("causal_family")
    out = tmp_path / "causal_family.json"
    assert bench.main(["--shape", "tiny", "--blocks", "2", "--no-decode", "--preset", "longlive", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["result"]
    assert result["blocks"] == 2 and result["chunk_sizes"] == [3] and result["video_fps_steady"] > 0
