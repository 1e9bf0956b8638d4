"""The drift monitor (runtime/drift.py) and its action policy (reanchor, KVRollout.recache).

- the signals stay under their thresholds on a steady synthetic stream and cross them on a synthetic
  drift of each kind (latent content, latent spread, motion, colour), with values a hand computation
  predicts;
- on the built-in demo model: a steady stream crosses nothing at the default thresholds;
  reanchor="recache" re-anchors (KVRollout.recache runs, counted), reanchor="off" only counts and
  leaves the stream bit for bit as it is, and a stream whose monitor never triggers equals one
  without re-anchoring bit for bit;
- recache() under an unchanged prompt before any block left the ring rewrites the K/V the ring
  already holds (the stream goes on unchanged at fp32 tolerance: a block-causal commit is a function
  of the blocks before it), and after evictions changes what follows;
- the server exports the monitor in /status and /metrics (read back by prometheus_client's parser).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import skyrt
from skyrt.runtime import kvcache
from skyrt.runtime.default_model import default_model_dir, recommended_sampling
from skyrt.runtime.drift import SIGNALS, DriftMonitor, DriftThresholds
from skyrt.runtime.request import GenerationRequest, validate_request
from skyrt.runtime.resolve import resolve_request
from skyrt.runtime.server.metrics import Metrics

C, H, W = 16, 8, 8  # latent chunk [C, 2, H, W] (a 64 x 64 stream's)
SIZE = 32  # synthetic frames [8, SIZE, SIZE, 3]


def steady_latents(rng, offset=None, scale=1.0) -> np.ndarray:
    """One chunk of latents with fixed per-channel statistics (channel c: mean c / 8, std 1), plus offset."""
    z = rng.standard_normal((C, 2, H, W)).astype(np.float32) * scale + (np.arange(C) / 8.0)[:, None, None, None]
    return z if offset is None else z + offset[:, None, None, None]


def moving_square(start: int, count: int = 8, colour=(180, 200, 60), speed: int = 1) -> np.ndarray:
    """`count` frames of a square crossing a gray background at `speed` pixels a frame: uint8 [n, S, S, 3]."""
    frames = np.full((count, SIZE, SIZE, 3), 90, np.uint8)
    for i in range(count):
        x = ((start + i) * speed) % (SIZE - 8)
        frames[i, 12:20, x : x + 8] = colour
    return frames


def run_monitor(monitor: DriftMonitor, chunks: int, drift_from: int | None = None, kind: str = "") -> list[bool]:
    """Feed `chunks` synthetic chunks; from chunk `drift_from` on, the drift `kind`. Returns observe()'s answers."""
    rng = np.random.default_rng(0)
    answers = []
    for k in range(chunks):
        drifting = drift_from is not None and k >= drift_from
        offset = np.zeros(C, np.float32)
        if drifting and kind == "latent_mean":
            offset[5] = 3.0  # channel 5 moves 3 standard deviations
        z = steady_latents(rng, offset, scale=2.5 if drifting and kind == "latent_std" else 1.0)
        frames = moving_square(8 * k)
        if drifting and kind == "freeze":  # the square stops: every frame the same, across chunks too
            frames = moving_square(0, speed=0)
        if drifting and kind == "colour":
            frames = np.clip(frames.astype(np.int16) + np.array([40, 0, -40], np.int16), 0, 255).astype(np.uint8)
        answers.append(monitor.observe(z, frames))
    return answers


# ----------------------------------------------------------------------------------------------
# The monitor on synthetic streams


def test_a_steady_stream_crosses_no_threshold():
    monitor = DriftMonitor(policy="recache")
    answers = run_monitor(monitor, 120)
    status = monitor.status()
    assert not any(answers)
    assert status["drifted_chunks"] == 0 and all(n == 0 for n in status["crossings"].values())
    assert all(v is not None for v in status["signals"].values())  # every signal measured
    assert status["reference_ready"] and status["chunks"] == 120


@pytest.mark.parametrize("kind, signal", [("latent_mean", "latent_mean_shift"), ("latent_std", "latent_std_ratio"),
                                          ("freeze", "frame_change_ratio"), ("colour", "colour_distance")])
def test_each_kind_of_drift_crosses_its_own_signal(kind, signal):
    monitor = DriftMonitor()  # reanchor off: it counts, never asks to act
    answers = run_monitor(monitor, 40, drift_from=20, kind=kind)
    status = monitor.status()
    assert not any(answers)
    assert status["crossings"][signal] > 0 and status["over_threshold"][signal]
    # Nothing crossed before the drift began: every crossing is in the 20 drifting chunks.
    assert status["drifted_chunks"] <= 20


def test_signal_values_match_a_hand_computation():
    """A channel moved by 3 of its standard deviations reads ~3; a colour shift of (+40, 0, -40) on the
    background-dominated frames reads its RGB distance; a frozen stream's change ratio is |log(floor / change)|."""
    mean_shift = DriftMonitor()
    run_monitor(mean_shift, 40, drift_from=10, kind="latent_mean")
    assert mean_shift.status()["signals"]["latent_mean_shift"] == pytest.approx(3.0, abs=0.35)
    colour = DriftMonitor()
    run_monitor(colour, 40, drift_from=10, kind="colour")
    # No pixel clips (square 180, 200, 60 and background 90 stay inside 0..255): the shift is exact.
    assert colour.status()["signals"]["colour_distance"] == pytest.approx(40 * math.sqrt(2), rel=0.02)


def test_the_policy_acts_once_per_excursion_and_off_never_acts():
    thresholds = DriftThresholds(cooldown_chunks=5)
    acting = DriftMonitor(thresholds, "recache")
    rng = np.random.default_rng(1)
    asked = []
    for k in range(30):
        offset = np.zeros(C, np.float32)
        offset[3] = 4.0 if k >= 12 else 0.0
        if acting.observe(steady_latents(rng, offset), moving_square(8 * k)):
            asked.append(k)
            acting.reanchored()
    assert asked and asked[0] >= 12
    assert all(b - a > thresholds.cooldown_chunks for a, b in zip(asked, asked[1:]))  # the cooldown holds
    assert acting.status()["reanchors"] == len(asked)


@pytest.mark.parametrize("cut", [3, 14, 25])  # before the reference is in, while smoothing, in a cooldown
def test_a_monitor_continues_from_its_exported_state_as_if_never_stopped(cut):
    """export_state -> (through JSON and float32 arrays, as a snapshot stores it) -> import_state on a fresh
    monitor: the rest of the stream gets the same answers and ends with the same status."""
    import json

    thresholds = DriftThresholds(cooldown_chunks=5)
    whole = DriftMonitor(thresholds, "recache")
    want = _answers_with_reanchors(whole, range(40))
    first = DriftMonitor(thresholds, "recache")
    got = _answers_with_reanchors(first, range(cut))
    state, arrays = first.export_state()
    state = json.loads(json.dumps(state))
    resumed = DriftMonitor(thresholds, "recache")
    resumed.import_state(state, {k: np.array(v) for k, v in arrays.items()})
    got += _answers_with_reanchors(resumed, range(cut, 40))
    assert got == want and any(want)
    assert resumed.status() == whole.status()
    with pytest.raises(ValueError, match="thresholds"):
        DriftMonitor(DriftThresholds(cooldown_chunks=6), "recache").import_state(state, arrays)


def _answers_with_reanchors(monitor: DriftMonitor, chunks) -> list[bool]:
    """Chunks k of a stream whose latent channel 3 moves by 4 std from chunk 12 on; re-anchors when asked."""
    answers = []
    for k in chunks:
        rng = np.random.default_rng(k)  # each chunk its own draw: a resumed run sees the same chunks
        offset = np.zeros(C, np.float32)
        offset[3] = 4.0 if k >= 12 else 0.0
        answers.append(monitor.observe(steady_latents(rng, offset), moving_square(8 * k)))
        if answers[-1]:
            monitor.reanchored()
    return answers


@pytest.mark.parametrize("bad", [dict(latent_mean_shift=-1.0), dict(colour_distance=float("nan")),
                                 dict(reference_chunks=0), dict(cooldown_chunks=-1)])
def test_bad_thresholds_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DriftThresholds(**bad)


def test_reanchor_is_a_resolved_setting_and_needs_a_cache():
    resolution = resolve_request({"prompt": "x", "mode": "kvcache", "reanchor": "recache"}, stream=True)
    assert resolution.request.reanchor == "recache" and resolution.set_by_user("reanchor")
    assert resolve_request({"prompt": "x"}, stream=True).request.reanchor == "off"
    with pytest.raises(ValueError, match="reanchor='recache'.*mode='kvcache'"):
        validate_request(GenerationRequest(prompt="x", mode="window", condition_noise="step", reanchor="recache"))
    with pytest.raises(ValueError, match="reanchor='sometimes'"):
        validate_request(GenerationRequest(prompt="x", mode="kvcache", condition_noise="once", reanchor="sometimes"))


# ----------------------------------------------------------------------------------------------
# On the built-in demo model


@pytest.fixture(scope="module")
def demo():
    """The shipped demo model and its recommended stream settings at 64 x 64 (kvcache, sink 0, window 3)."""
    pipe = skyrt.load(default_model_dir())
    settings = {k: v for k, v in recommended_sampling(default_model_dir()).items() if k not in ("height", "width")}
    return pipe, {**settings, "height": 64, "width": 64, "seed": 3}


PROMPT = "a yellow circle moving up on a dark green background"
FORCED = DriftThresholds(**{s: 0.0 for s in SIGNALS}, reference_chunks=2, smooth_chunks=1, cooldown_chunks=3)
NEVER = DriftThresholds(**{s: math.inf for s in SIGNALS})


def stream_latents(pipe, settings, chunks, **kwargs) -> tuple[np.ndarray, dict]:
    """`chunks` latent blocks of a stream [16, F, h, w] and its drift status at the end."""
    stream = pipe.stream(PROMPT, output="latent", max_chunks=chunks, **{**settings, **kwargs})
    blocks = list(stream)
    return np.concatenate(blocks, axis=1), stream.drift_status()


def test_a_steady_demo_stream_crosses_no_default_threshold(demo):
    """At the model's own size (128 x 128) a stream of a held-out prompt stays on its first blocks' statistics."""
    pipe, settings = demo
    stream = pipe.stream("a green cross moving right on a brown background", max_chunks=40, reanchor="recache",
                         **{**settings, "height": 128, "width": 128})
    frames = np.concatenate(list(stream))
    status = stream.drift_status()
    assert len(frames) > 300 and status["chunks"] == 40
    assert status["drifted_chunks"] == 0 and status["reanchors"] == 0, status["signals"]


def test_the_monitor_catches_the_demo_models_own_drift(demo):
    """At 64 x 64 (half the size it was trained at) the demo model loses the circle after ~30 blocks: the
    detector reads no shape any more, and the monitor's signals cross their thresholds."""
    from skyrt_demo.detector import score_clip
    from skyrt_demo.world import parse_prompt

    pipe, settings = demo
    stream = pipe.stream(PROMPT, max_chunks=40, **settings)
    chunks = list(stream)
    status = stream.drift_status()
    first, last = (score_clip(np.concatenate(part), parse_prompt(PROMPT)).adherence for part in (chunks[:8], chunks[-5:]))
    assert first >= 0.8 and last <= 0.6  # the detector, an independent reading, sees the drift
    assert status["drifted_chunks"] > 0 and status["reanchors"] == 0  # reanchor off: counted only
    assert sum(status["over_threshold"].values()) >= 2, status["signals"]


def test_reanchor_recache_triggers_the_rollouts_recache(demo, monkeypatch):
    pipe, settings = demo
    calls = []
    original = kvcache.KVRollout.recache

    def counted(self):
        calls.append(self.core.next_slot())
        original(self)

    monkeypatch.setattr(kvcache.KVRollout, "recache", counted)
    _, status = stream_latents(pipe, settings, 14, reanchor="recache", drift=FORCED)
    assert status["reanchors"] == len(calls) >= 3  # chunk 3, then once per cooldown
    assert status["crossings"]["latent_mean_shift"] > 0


def test_reanchor_off_counts_but_leaves_the_stream_bit_for_bit(demo, monkeypatch):
    pipe, settings = demo
    plain, _ = stream_latents(pipe, settings, 14)
    monkeypatch.setattr(kvcache.KVRollout, "recache", lambda self: pytest.fail("reanchor='off' re-anchored"))
    watched, status = stream_latents(pipe, settings, 14, reanchor="off", drift=FORCED)
    assert status["drifted_chunks"] > 0 and status["reanchors"] == 0
    np.testing.assert_array_equal(watched, plain)


def test_a_monitor_that_never_triggers_leaves_a_recache_stream_bit_for_bit(demo):
    pipe, settings = demo
    plain, _ = stream_latents(pipe, settings, 14)
    quiet, status = stream_latents(pipe, settings, 14, reanchor="recache", drift=NEVER)
    assert status["reanchors"] == 0
    np.testing.assert_array_equal(quiet, plain)


def test_recache_before_any_eviction_rewrites_the_same_kv_and_after_evictions_changes_what_follows(demo):
    """Window 3, sink 0: after chunk 2 the ring holds blocks 0 and 1, which saw nothing else when they
    were committed, so their re-commit under the same prompt is the same K/V; after chunk 8 blocks have
    left the ring and the oldest kept block is re-committed without its history."""
    pipe, settings = demo
    plain, _ = stream_latents(pipe, settings, 12)
    once_early = DriftThresholds(**{s: 0.0 for s in SIGNALS}, reference_chunks=1, smooth_chunks=1,
                                 cooldown_chunks=1000)
    early, status = stream_latents(pipe, settings, 12, reanchor="recache", drift=once_early)
    assert status["reanchors"] == 1
    np.testing.assert_allclose(early, plain, rtol=0, atol=1e-5)
    once_late = DriftThresholds(**{s: 0.0 for s in SIGNALS}, reference_chunks=7, smooth_chunks=1,
                                cooldown_chunks=1000)
    late, status = stream_latents(pipe, settings, 12, reanchor="recache", drift=once_late)
    assert status["reanchors"] == 1
    block = settings["causal_block_size"]
    np.testing.assert_array_equal(late[:, : 8 * block], plain[:, : 8 * block])  # up to the re-anchor: the same
    assert np.abs(late[:, 8 * block :] - plain[:, 8 * block :]).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Server figures


def test_status_and_metrics_export_the_monitor_and_keep_totals_across_streams():
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics()
    assert metrics.snapshot()["drift"] is None and "skyrt_drift" not in metrics.prometheus()
    first = DriftMonitor(DriftThresholds(cooldown_chunks=0), "recache")
    rng = np.random.default_rng(2)
    for k in range(20):
        offset = np.zeros(C, np.float32)
        offset[0] = 5.0 if k >= 10 else 0.0
        if first.observe(steady_latents(rng, offset), moving_square(8 * k)):
            first.reanchored()
        metrics.drift_observed(first.status())
    made = first.status()["reanchors"]
    assert made > 0
    second = DriftMonitor()  # the generator restarted: a new stream's monitor
    second.observe(steady_latents(rng), moving_square(0))
    metrics.drift_observed(second.status())
    shown = metrics.snapshot()["drift"]
    assert shown["chunks"] == 1 and shown["reanchors"] == 0 and shown["reanchors_total"] == made
    families = {f.name: f for f in text_string_to_metric_families(metrics.prometheus())}
    assert families["skyrt_drift_reanchors"].samples[0].value == made  # the parser drops _total
    crossings = {s.labels["signal"]: s.value for s in families["skyrt_drift_crossings"].samples}
    assert crossings["latent_mean_shift"] == first.status()["crossings"]["latent_mean_shift"] > 0
    thresholds = {s.labels["signal"]: s.value for s in families["skyrt_drift_threshold"].samples}
    assert thresholds == {s: DriftThresholds().of(s) for s in SIGNALS}
    assert set(s.labels["signal"] for s in families["skyrt_drift_signal"].samples) == set(SIGNALS)
