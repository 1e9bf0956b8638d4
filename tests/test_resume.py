"""Snapshot and resume of a kvcache stream, in process: the rollout core's export_state / import_state
(csrc/rollout_state.cpp), the stream's (runtime/kvcache.py, runtime/pipeline.py: noise generator, prompt
contexts, streaming decoder) and the snapshot file (runtime/snapshot.py).

The oracle is the same stream run without interruption: a stream snapshotted after k blocks, written to
a file, read back and resumed in a fresh stream must give the uninterrupted stream's blocks k, k+1, ...
(latents and decoded frames). Refusals: a corrupt, truncated, wrong-model, wrong-settings, wrong-version
or symlinked file is a SnapshotRefused naming the reason, never a resumed garbage stream.

Run: python -m pytest tests/test_resume.py -q
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from skyrt import _core
from skyrt.runtime import kvcache
from skyrt.runtime.snapshot import SnapshotRefused, encode_snapshot, read_snapshot, write_snapshot

H = W = 32
MODEL = "test-model-identity"


def _stream(pipe, resume=None, **overrides):
    settings = dict(prompt="a red circle " * 40, height=H, width=W, num_inference_steps=3, guidance_scale=1.0,
                    ar_step=1, causal_block_size=1, mode="kvcache", causal_attention=True, sink_blocks=1,
                    window_blocks=3, seed=7, output="latent")
    settings.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return pipe.stream(resume=resume, **settings)


def _take(stream, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [np.array(next(stream)) for _ in range(n)]


def _snapshot_after(pipe, k, tmp_path, overrides, switch_at=None):
    """A stream of `overrides` snapshotted to a file after k chunks, read back (checked)."""
    stream = _stream(pipe, **overrides)
    for i in range(k):
        _take(stream, 1)
        if switch_at == i + 1:
            stream.set_prompt("a blue square " * 40, recache=True)
    state, arrays = stream.export_state()
    stream.close()
    settings = {"case": json.dumps(overrides, sort_keys=True, default=repr)}
    path = tmp_path / "stream.npz"
    size = write_snapshot(path, state, arrays, settings, MODEL)
    print(f"snapshot after {k} chunks: {size} bytes, {len(arrays)} arrays")
    return read_snapshot(path, settings, MODEL)


CASES = {  # name: (stream settings, blocks before the snapshot, blocks after)
    # one block in flight at a time, blocks evicted from a ring of 1 + 3
    "async_evicting": (dict(ar_step=3), 5, 4),
    # three blocks in flight (staggered) with CFG: sampler history of partly denoised blocks travels
    "async_cfg_in_flight": (dict(ar_step=1, guidance_scale=5.0), 4, 4),
    "euler_blocks_of_2": (dict(ar_step=1, causal_block_size=2, sampler="euler"), 3, 3),
    "no_sink": (dict(ar_step=1, sink_blocks=0, window_blocks=2), 4, 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_stream_equals_uninterrupted_stream(official_pipeline, tmp_path, name):
    overrides, k, after = CASES[name]
    pipe = official_pipeline
    want = _take(_stream(pipe, **overrides), k + after)
    snapshot = _snapshot_after(pipe, k, tmp_path, overrides)
    assert snapshot.state["blocks"] == k
    got = _take(_stream(pipe, resume=snapshot, **overrides), after)
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want[k:]))
    print(f"{name}: max |resumed - uninterrupted| over {after} blocks = {diff:.3g}")
    assert all(g.shape == w.shape for g, w in zip(got, want[k:]))
    assert diff == 0.0  # the same arithmetic on the same state: bit for bit


@pytest.mark.parametrize("k", [3, 5])  # 3: the monitor has just asked to re-anchor; 5: in its cooldown
def test_resume_keeps_the_drift_monitor_so_reanchors_fall_on_the_same_blocks(official_pipeline, tmp_path, k):
    """A stream that re-anchors (every signal's threshold 0: once per cooldown) snapshotted after k blocks:
    the resumed monitor keeps its reference, smoothed chunks and cooldown, and a re-anchor asked for after
    the last saved block is done on resume, so re-anchors fall on the same blocks and the latents stay the
    uninterrupted stream's; a fresh monitor would re-read its reference from the resumed blocks."""
    from skyrt.runtime.drift import SIGNALS, DriftThresholds

    overrides = dict(ar_step=3, reanchor="recache",
                     drift=DriftThresholds(**{s: 0.0 for s in SIGNALS}, reference_chunks=2, smooth_chunks=1,
                                           cooldown_chunks=3))
    uninterrupted = _stream(official_pipeline, **overrides)
    want = _take(uninterrupted, 11)
    want_drift = uninterrupted.drift_status()
    snapshot = _snapshot_after(official_pipeline, k, tmp_path, overrides)
    drift = snapshot.state["drift"]
    if k == 3:
        assert snapshot.state["reanchor_pending"] and drift["reanchors"] == 0
    else:
        assert not snapshot.state["reanchor_pending"] and drift["reanchors"] == 1 and drift["cooldown"] > 0
    resumed = _stream(official_pipeline, resume=snapshot, **overrides)
    got = _take(resumed, 11 - k)
    assert resumed.drift_status() == want_drift and want_drift["reanchors"] >= 2
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want[k:])) == 0.0


def test_resume_across_a_rope_rebase(official_pipeline, tmp_path, monkeypatch):
    """A small RoPE table makes the ring rebase before and after the snapshot: the origin and the keys
    rotated by the rebase travel with the state."""
    monkeypatch.setattr(kvcache, "ROPE_TABLE", 6)
    overrides = dict(ar_step=3, sink_blocks=1, window_blocks=2)
    want = _take(_stream(official_pipeline, **overrides), 12)
    snapshot = _snapshot_after(official_pipeline, 7, tmp_path, overrides)
    assert int(snapshot.arrays["core/ring"][1]) > 0  # the ring's origin moved before the snapshot
    got = _take(_stream(official_pipeline, resume=snapshot, **overrides), 5)
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want[7:])) == 0.0


def test_resume_after_a_prompt_switch(official_pipeline, tmp_path):
    """The switched prompt is part of the state: the resumed stream goes on with it, not the first one."""
    overrides = dict(ar_step=3)
    stream = _stream(official_pipeline, **overrides)
    want = _take(stream, 2)
    stream.set_prompt("a blue square " * 40, recache=True)
    want += _take(stream, 5)
    snapshot = _snapshot_after(official_pipeline, 4, tmp_path, overrides, switch_at=2)
    assert snapshot.state["prompt"].startswith("a blue square")
    resumed = _stream(official_pipeline, resume=snapshot, prompt="a blue square " * 40, **overrides)
    got = _take(resumed, 3)
    assert resumed.prompt.startswith("a blue square")
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want[4:])) == 0.0
    # Resumed with another prompt (what a server's control state says now): it takes over at the next block.
    other = _stream(official_pipeline, resume=snapshot, prompt="a green star", **overrides)
    first, second = _take(other, 2)
    assert np.array_equal(first, want[4])  # the block after the snapshot is the saved stream's
    assert other.prompt == "a green star" and not np.array_equal(second, want[5])  # then the switch


def test_resumed_frames_equal_uninterrupted_frames(official_pipeline, tmp_path):
    """Decoded frames too: the streaming VAE decoder's causal caches travel with the snapshot (a fresh
    decoder would decode the next latent as a first frame: 1 pixel frame, not 4)."""
    overrides = dict(ar_step=3, output="frames")
    want = _take(_stream(official_pipeline, **overrides), 5)
    snapshot = _snapshot_after(official_pipeline, 3, tmp_path, overrides)
    assert any(k.startswith("decoder/") for k in snapshot.arrays)
    got = _take(_stream(official_pipeline, resume=snapshot, **overrides), 2)
    for g, w in zip(got, want[3:]):
        assert g.shape == w.shape and np.array_equal(g, w)


# ---------------------------------------------------------------------------------------- the core
def _core_of(**overrides):
    kwargs = dict(step_template=[999, 500], sigmas=[0.99, 0.5, 0.0], ar_step=1, max_blocks_in_flight=2,
                  sink_blocks=1, window_blocks=2, channels=2, height=2, width=2, tokens_per_frame=1, layers=1,
                  heads=1, head_dim=8)
    kwargs.update(overrides)
    return _core.RolloutCore(**kwargs)


def _drive(core, rows, rng):
    """A few schedule rows with random velocities and K/V (no model: the core's bookkeeping only)."""
    for _ in range(rows):
        plan = core.next_row()
        for blk in plan.started:
            core.start_block(blk, rng.standard_normal((2, 1, 2, 2), dtype=np.float32))
        if plan.active:
            frames = core.pack_active()
            core.buffer("velocity", frames).numpy()[:] = rng.standard_normal((1, 2, frames, 2, 2))
            core.apply_velocity()
        for blk in plan.finished:
            core.finish_block(blk)
            slot = core.next_slot()
            core.pack_store(slot)
            core.buffer("new_k", 1).numpy()[:] = rng.standard_normal((1, 1, 1, 1, 8))
            core.buffer("new_v", 1).numpy()[:] = rng.standard_normal((1, 1, 1, 1, 8))
            core.commit(blk, 0.0)


def test_core_state_round_trip_continues_identically():
    a, b = _core_of(), _core_of()
    _drive(a, 6, np.random.default_rng(1))
    state = a.export_state()
    b.import_state(state)
    for name, value in state.items():
        assert np.array_equal(b.export_state()[name], value), name
    _drive(a, 5, np.random.default_rng(2))
    _drive(b, 5, np.random.default_rng(2))
    after_a, after_b = a.export_state(), b.export_state()
    assert all(np.array_equal(after_a[n], after_b[n]) for n in after_a)
    assert int(after_a["schedule"][2]) == 11  # 11 rows in all


def test_core_refuses_a_state_of_another_configuration():
    a = _core_of()
    _drive(a, 3, np.random.default_rng(1))
    other = _core_of(window_blocks=3)
    before = other.export_state()
    with pytest.raises(ValueError, match="window_blocks = 2, this core has 3"):
        other.import_state(a.export_state())
    with pytest.raises(ValueError, match=r"sigmas\[1\]"):
        _core_of(sigmas=[0.99, 0.4, 0.0]).import_state(a.export_state())
    assert all(np.array_equal(other.export_state()[n], v) for n, v in before.items())  # left as it was


def test_core_refuses_a_malformed_state_and_stays_unchanged():
    a, b = _core_of(), _core_of()
    _drive(a, 3, np.random.default_rng(1))
    before = b.export_state()
    state = a.export_state()
    bad = dict(state, cache_k=state["cache_k"][..., :4].copy())
    with pytest.raises(ValueError, match="'cache_k' is"):
        b.import_state(bad)
    missing = {k: v for k, v in state.items() if k != "slot_history"}
    with pytest.raises(ValueError, match="no 'slot_history'"):
        b.import_state(missing)
    wrong_version = dict(state, config_int=np.concatenate([[99], state["config_int"][1:]]))
    with pytest.raises(ValueError, match="version 99"):
        b.import_state(wrong_version)
    slots = state["slots"].copy()
    slots[0, 0] = 5  # block 5 cannot sit in slot 0 of a 2-slot core
    with pytest.raises(ValueError, match="in-flight slot 0"):
        b.import_state(dict(state, slots=slots))
    assert all(np.array_equal(b.export_state()[n], v) for n, v in before.items())


def test_rolling_cache_sink_frame_is_restored():
    core = _core_of(max_blocks_in_flight=2)
    rolling = _core.RollingCache(core, 2, 3)
    rolling.restore_sink_frame(5)
    assert rolling.sink_frame == 5


# ---------------------------------------------------------------------------------------- the file
def _write(tmp_path, name="s.npz", settings=None, model=MODEL):
    arrays = {"core/x": np.arange(1000, dtype=np.float32), "core/n": np.array([3, 4], np.int64)}
    path = tmp_path / name
    write_snapshot(path, {"blocks": 3}, arrays, settings or {"steps": 3}, model)
    return path


def test_snapshot_file_round_trip(tmp_path):
    snap = read_snapshot(_write(tmp_path), {"steps": 3}, MODEL)
    assert snap.state == {"blocks": 3}
    assert np.array_equal(snap.arrays["core/x"], np.arange(1000, dtype=np.float32))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left


def test_snapshot_refuses_a_corrupt_file(tmp_path):
    path = _write(tmp_path)
    data = bytearray(path.read_bytes())
    offset = data.index(np.arange(1000, dtype=np.float32)[500:504].tobytes())
    data[offset] ^= 0xFF  # one bit pattern of one array changed in place
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotRefused, match="corrupt"):
        read_snapshot(path, {"steps": 3}, MODEL)


def test_snapshot_refuses_a_truncated_file(tmp_path):
    path = _write(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SnapshotRefused, match="corrupt or truncated"):
        read_snapshot(path, {"steps": 3}, MODEL)
    path.write_bytes(b"")
    with pytest.raises(SnapshotRefused, match="corrupt or truncated"):
        read_snapshot(path, {"steps": 3}, MODEL)


def test_snapshot_refuses_another_model_settings_or_version(tmp_path):
    path = _write(tmp_path)
    with pytest.raises(SnapshotRefused, match="another model"):
        read_snapshot(path, {"steps": 3}, "another-model")
    with pytest.raises(SnapshotRefused, match="other settings: steps was 3, now 4"):
        read_snapshot(path, {"steps": 4}, MODEL)
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays.pop("__header__").tobytes())
    header["skyrt"] = "0.0.1"
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(SnapshotRefused, match="written by skyrt '0.0.1'"):
        read_snapshot(path, {"steps": 3}, MODEL)


def test_model_identity_reads_a_model_once_and_follows_its_contents(tmp_path, monkeypatch):
    """A restart must not re-read a multi-GB checkpoint to name the model, yet a changed file must
    change the name (the memo is keyed by path, size and mtime)."""
    from skyrt.runtime import artifact_cache
    from skyrt.runtime.snapshot import model_identity

    monkeypatch.setenv("SKYRT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"\x01" * 1000)
    reads = []
    real_sha = artifact_cache.file_sha256
    monkeypatch.setattr(artifact_cache, "file_sha256", lambda p: reads.append(p) or real_sha(p))
    first = model_identity(model)
    assert len(reads) == 2
    assert model_identity(model) == first and len(reads) == 2  # remembered: nothing read again
    (model / "weights.bin").write_bytes(b"\x02" * 1001)
    assert model_identity(model) != first and len(reads) == 3  # only the changed file is read


def test_snapshot_refuses_a_symlink(tmp_path):
    target = _write(tmp_path, "real.npz")
    link = tmp_path / "s.npz"
    os.symlink(target, link)
    with pytest.raises(SnapshotRefused, match="symbolic link"):
        read_snapshot(link, {"steps": 3}, MODEL)


def test_snapshot_refuses_pickled_arrays(tmp_path):
    """An object array (what only pickle can load) is refused by allow_pickle=False, not run."""
    path = tmp_path / "s.npz"
    good = encode_snapshot({"blocks": 1}, {"core/x": np.zeros(2, np.float32)}, {"steps": 3}, MODEL)
    path.write_bytes(good)
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["core/x"] = np.array([{"a": 1}], dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(SnapshotRefused, match="corrupt or truncated"):
        read_snapshot(path, {"steps": 3}, MODEL)


# ------------------------------------------------------------------------------- the causal family
@pytest.mark.parametrize("name", ["rolling_forcing", "longlive"])
def test_causal_preset_stream_resumes_exactly(tmp_path, monkeypatch, name):
    """Rolling-Forcing (several blocks in flight at staggered steps, the sink's keys re-rotated per call;
    between blocks the last call was a commit, which leaves the sink at its own frame 0, so the saved sink
    frame is 0 here and its restore a no-op) and LongLive (its recache after a prompt switch, the evicted block's input kept
    aside), through a ring of 1 + 2 so blocks are evicted on both sides of the snapshot."""
    import skyrt
    import torch
    from causal_checkpoints import load_recipes, write_model_folder

    from skyrt.runtime.backends.base import TextContext

    recipe = load_recipes()[name]
    options = {"lora_alpha": recipe["lora"]["alpha"]} if recipe.get("lora") else {}
    pipe = skyrt.load(write_model_folder(recipe, tmp_path / "model"), preset=recipe["family"], **options)
    contexts: dict = {}

    def encode(prompt):  # the umT5 stand-in: a seeded random context per prompt
        if prompt not in contexts:
            rng = np.random.default_rng(len(contexts))
            contexts[prompt] = torch.from_numpy(rng.standard_normal((1, 512, 32), dtype=np.float32))
        return TextContext(prompt, contexts[prompt])

    monkeypatch.setattr(pipe.backend, "encode_text", encode)
    settings = dict(height=32, width=48, sink_blocks=1, window_blocks=2, seed=5, output="latent")

    def stream(resume=None, prompt="a"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return pipe.stream(prompt, resume=resume, **settings)

    def run(s, n, switch_at=3):
        out = []
        for blk in range(n):
            if blk == switch_at:
                s.set_prompt("b", recache=True)
            out.append(np.array(next(s)))
        return out

    want = run(stream(), 9)
    first = stream()
    run(first, 5)
    state, arrays = first.export_state()
    first.close()
    path = tmp_path / "s.npz"
    write_snapshot(path, state, arrays, {"case": name}, MODEL)
    snapshot = read_snapshot(path, {"case": name}, MODEL)
    assert snapshot.state["sink_frame"] == (0 if name == "rolling_forcing" else None)
    got = run(stream(resume=snapshot, prompt="b"), 4, switch_at=None)  # "b": the prompt in effect
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want[5:]))
    print(f"{name}: max |resumed - uninterrupted| over 4 blocks = {diff:.3g}")
    assert diff == 0.0


def test_exported_graph_decoder_caches_resume(official_dir, tmp_path):
    """The onnxruntime backend's streaming decoder (bound buffers, runtime/backends/exported_graphs.py):
    its caches downloaded after 3 frames and uploaded into a fresh decoder decode the next frames
    exactly as the first decoder goes on; no caches ({}) is a decoder at its first frame."""
    pytest.importorskip("onnxruntime")
    import skyrt

    backend = skyrt.load(official_dir, backend="onnxruntime", cache_dir=tmp_path).backend
    rng = np.random.default_rng(0)
    frames = [rng.standard_normal((16, 1, 4, 4), dtype=np.float32) for _ in range(6)]
    first = backend.streaming_decoder()
    assert first.export_state() == {}
    for z in frames[:3]:
        first.decode_next(z)
    state = first.export_state()
    want = [first.decode_next(z) for z in frames[3:]]
    second = backend.streaming_decoder()
    second.import_state(state)
    got = [second.decode_next(z) for z in frames[3:]]
    assert all(g.shape == (3, 4, 32, 32) and np.array_equal(g, w) for g, w in zip(got, want))
    fresh = backend.streaming_decoder()
    fresh.import_state({})
    assert fresh.decode_next(frames[0]).shape == (3, 1, 32, 32)
