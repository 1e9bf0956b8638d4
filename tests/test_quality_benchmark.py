"""benchmarks/quality.py: the switch-latency bookkeeping, on world-rendered streams whose delay is known.

A stand-in stream renders the demo world itself (the detector reads it ~perfectly) and keeps showing
the old prompt for a chosen number of frames after set_prompt; the benchmark must report that delay,
in frames and in each run's own chunks.
"""
from __future__ import annotations

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

import skyrt
import skyrt_demo.world as W


class DelayedWorldStream:
    """Chunks of `chunk` frames of a world scene; set_prompt takes effect `delay` frames later."""

    def __init__(self, attrs: W.Attributes, chunk: int, delay: int, seed: int):
        self.scene = W.Scene(attrs, 64, 64, seed=seed)
        self.chunk, self.delay = chunk, delay
        self.pending: tuple[int, W.Attributes] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        frames = []
        for _ in range(self.chunk):  # frame by frame, so the delayed switch lands on its exact frame
            if self.pending and self.scene.frame >= self.pending[0]:
                self.scene.set_attributes(self.pending[1])
                self.pending = None
            frames.append(self.scene.render(1)[0])
        return np.concatenate(frames)

    def set_prompt(self, prompt: str, recache: bool = False) -> None:
        self.pending = (self.scene.frame + self.delay, W.parse_prompt(prompt))

    def close(self) -> None:
        pass


def test_switch_latency_is_counted_in_each_runs_own_chunks(monkeypatch):
    q = load_benchmark("quality")
    pairs = [(W.Attributes("circle", "red", "still", "black"), W.Attributes("square", "green", "still", "dark blue")),
             (W.Attributes("diamond", "yellow", "still", "gray"), W.Attributes("circle", "blue", "still", "brown"))]
    runs = iter([(8, 16), (4, 12)])  # (chunk frames, switch delay in frames) of each run

    def open_stream(pipe, prompt, *args, **kwargs):
        chunk, delay = next(runs)
        return DelayedWorldStream(W.parse_prompt(prompt), chunk, delay, seed=1)

    monkeypatch.setattr(q, "open_stream", open_stream)
    result = q.switch_run(None, pairs, {}, {}, 2, 64, warm_chunks=2, after_frames=48, recache=False, seed=0)
    frames = [r["latency_frames"] for r in result["runs"]]
    assert frames == [r["latency_frames_without_shape"] for r in result["runs"]]
    # The reading window starts counting once SWITCH_HITS of its SWITCH_WINDOW frames show the new prompt.
    early = q.SWITCH_WINDOW - q.SWITCH_HITS
    assert frames == [16 - early, 12 - early]
    assert result["switched"] == result["switched_without_shape"] == 1.0
    per_run_chunks = [frames[0] / 8, frames[1] / 4]  # (16 - 2) / 8 and (12 - 2) / 4 chunks
    assert result["mean_latency_chunks"] == pytest.approx(np.mean(per_run_chunks))
    assert result["mean_latency_chunks_without_shape"] == pytest.approx(np.mean(per_run_chunks))


def test_a_prompt_that_never_shows_has_no_latency(monkeypatch):
    q = load_benchmark("quality")
    pairs = [(W.Attributes("circle", "red", "still", "black"), W.Attributes("square", "green", "still", "dark blue"))]
    monkeypatch.setattr(q, "open_stream", lambda pipe, prompt, *a, **k: DelayedWorldStream(W.parse_prompt(prompt),
                                                                                          8, 10**6, seed=1))
    result = q.switch_run(None, pairs, {}, {}, 2, 64, warm_chunks=1, after_frames=32, recache=False, seed=0)
    assert result["switched"] == 0.0 and result["mean_latency_chunks"] is None
    assert result["mean_latency_chunks_without_shape"] is None


def _world_streams(draw_as: dict[str, str]):
    """open_stream stand-in: a world stream of the prompt, with shapes in `draw_as` drawn as another shape."""

    def open_stream(pipe, prompt, *args, **kwargs):
        attrs = W.parse_prompt(prompt)
        drawn = W.Attributes(draw_as.get(attrs.shape, attrs.shape), attrs.colour, attrs.motion, attrs.background,
                             attrs.camera)
        return DelayedWorldStream(drawn, chunk=8, delay=0, seed=3)

    return open_stream


def test_shape_grid_reads_every_world_shape(monkeypatch):
    q = load_benchmark("quality")
    monkeypatch.setattr(q, "open_stream", _world_streams({}))
    grid = q.shape_grid_run(None, {}, {}, 2, 64, clip_frames=24, seed=0)
    assert grid["pairs"] == len(W.COLOURS) * len(W.SHAPES)
    assert grid["correct"] == grid["pairs"]
    assert grid["heldout_pairs"] == len(W.HELDOUT_COLOUR_SHAPE)  # "still" on "black" holds out no motion pair
    assert all(v == 1.0 for v in grid["per_shape"].values())


def test_shape_grid_confusion_names_the_shape_drawn(monkeypatch):
    q = load_benchmark("quality")
    monkeypatch.setattr(q, "open_stream", _world_streams({"cross": "diamond"}))
    grid = q.shape_grid_run(None, {}, {}, 2, 64, clip_frames=24, seed=0, colours=["red", "green", "blue"])
    assert grid["pairs"] == 15 and grid["correct"] == 12
    assert grid["confusion"]["cross"] == {"diamond": 3}
    assert grid["confusion"]["diamond"] == {"diamond": 3}
    assert grid["per_shape"]["cross"] == 0.0 and grid["per_shape"]["circle"] == 1.0
    # ("green", "cross") is the one held-out pair among these colours; it was drawn as a diamond.
    assert (grid["heldout_pairs"], grid["heldout_correct"]) == (1, 0)


# ----------------------------------------------------------------------------------------------
# --long: partial reports, per-attribute minutes, the model-cap reading, merging


class WorldPipe:
    """pipe.stream stand-in for long_run: a world stream of the prompt that draws `wrong_shape` instead of
    the prompt's shape from frame `wrong_from` on, with a drift monitor that never fires."""

    def __init__(self, wrong_shape: str, wrong_from: int):
        self.wrong_shape, self.wrong_from = wrong_shape, wrong_from

    def stream(self, prompt, **kwargs):
        attrs = W.parse_prompt(prompt)
        stream = DelayedWorldStream(attrs, chunk=8, delay=0, seed=2)
        wrong = W.Attributes(self.wrong_shape, attrs.colour, attrs.motion, attrs.background, attrs.camera)
        stream.pending = (self.wrong_from, wrong)
        stream.drift_status = lambda: {"signals": {"latent_mean_shift": 0.1}, "reanchors": 0, "drifted_chunks": 0}
        return stream


FPS, WINDOW = 8, 16  # a stream minute of 480 frames, read in 2 s windows of 16 frames
STILL = W.Attributes("circle", "red", "still", "dark blue")


def _long_run(q, pipe, frames, progress=None):
    return q.long_run(pipe, STILL, {"mode": "kvcache"}, "off", None, {}, 2, 64, frames, WINDOW, FPS, seed=0,
                      on_progress=progress, progress_every_s=0.0)


def test_long_run_reports_partial_results_and_the_attribute_that_drifts():
    q = load_benchmark("quality")
    partials = []
    result = _long_run(q, WorldPipe("square", wrong_from=480), 960, partials.append)
    # Every partial report is a valid report of the frames so far, marked as such.
    assert partials and all(p["partial"] for p in partials) and not result["partial"]
    assert [p["frames"] for p in partials] == sorted(p["frames"] for p in partials)
    assert all(p["frames"] < 960 for p in partials) and result["frames"] == 960
    assert partials[-1]["windows"] == result["windows"][: len(partials[-1]["windows"])]
    # Minute 0 draws the prompt; minute 1 a square: the shape reading (1 of 5 attributes) is lost.
    first, second = result["per_minute"]
    assert first["per_attribute"]["shape"] == 1.0 and second["per_attribute"]["shape"] == 0.0
    assert result["drop_points"] == pytest.approx(20.0, abs=1e-6)
    cap = result["model_cap"]
    assert cap["capped_by_model"] is False and cap["failing_from_first_minute"] == {}
    assert cap["worse_in_last_minute"] == {"shape": 1.0}


def test_a_shape_wrong_from_the_start_is_the_models_cap():
    q = load_benchmark("quality")
    result = _long_run(q, WorldPipe("square", wrong_from=0), 480)
    cap = result["model_cap"]
    assert cap["capped_by_model"] is True
    assert cap["failing_from_first_minute"] == {"shape": 0.0} and cap["ceiling"] == pytest.approx(0.8)
    assert result["adherence_first_minute"] == pytest.approx(0.8) and result["drop_points"] == pytest.approx(0.0)


def _long_report(q, tmp_path, name: str, result: dict, prompt: str = STILL.prompt) -> "Path":
    result = {**result, "setting_name": "kv", "targets": q.long_targets(result)}
    report = {"benchmark": "quality_long", "model": "world", "prompt": prompt, "machine": {"device": "cpu"},
              "config": {"fps": FPS}, "variants": {name: result}}
    path = tmp_path / f"{name}.json"
    q.write_long_report(report, path, quiet=True)
    return path


def test_merge_of_partial_long_reports_keeps_each_variant_and_its_state(tmp_path, monkeypatch):
    import json

    q = load_benchmark("quality")
    monkeypatch.setattr(q, "plot_long", lambda report, path: False)  # the plot is not what this reads (and slow)
    partials = []
    done = _long_run(q, WorldPipe("square", wrong_from=10**6), 480, partials.append)
    a = _long_report(q, tmp_path, "default", partials[0])
    b = _long_report(q, tmp_path, "default_reanchor", done)
    out = tmp_path / "merged.json"
    q.merge_long([a, b], out)
    merged = json.loads(out.read_text())
    assert set(merged["variants"]) == {"default", "default_reanchor"}
    assert merged["partial"] is True  # one of them was still running
    assert merged["summary"]["default"]["partial"] and not merged["summary"]["default_reanchor"]["partial"]
    assert merged["summary"]["default"]["frames"] == partials[0]["frames"] < done["frames"] == 480
    with pytest.raises(SystemExit, match="more than one report"):
        q.merge_long([a, a], tmp_path / "twice.json")
    other = _long_report(q, tmp_path, "window", done, prompt="a blue square still on a black background")
    with pytest.raises(SystemExit, match="different models or prompts"):
        q.merge_long([a, other], tmp_path / "other.json")


def test_backend_check_passes_the_same_rollout_and_stops_another():
    q = load_benchmark("quality")
    same = q.backend_check(WorldPipe("square", 10**6), WorldPipe("square", 10**6), STILL, {"mode": "kvcache"}, {}, 2,
                           64, frames=24, seed=0)
    assert same["frames"] == 24 and same["max_abs_diff_levels"] == 0 and same["fraction_differing"] == 0.0
    with pytest.raises(SystemExit, match="not torch's"):  # the shape changes at frame 12: not the same rollout
        q.backend_check(WorldPipe("square", 12), WorldPipe("square", 10**6), STILL, {"mode": "kvcache"}, {}, 2, 64,
                        frames=24, seed=0)


# ----------------------------------------------------------------------------------------------
# --long --checkpoint-dir: a run stopped anywhere continues frame for frame (the real demo model)


def test_a_long_run_resumed_from_its_checkpoint_reads_the_uninterrupted_runs_windows(tmp_path):
    """The demo model at 64 x 64, re-anchoring on (every threshold 0: a re-anchor per cooldown): a run to
    48 frames that snapshots at every partial report, then a second run to 96 frames on the same
    checkpoint, reads exactly the windows (adherence, attributes, drift signals, re-anchors) of one
    uninterrupted 96-frame run; a checkpoint of another run is refused."""
    from skyrt.runtime.default_model import default_model_dir, recommended_sampling
    from skyrt.runtime.drift import SIGNALS, DriftThresholds

    q = load_benchmark("quality")
    pipe = skyrt.load(default_model_dir())
    sampling = q.sampling_defaults(recommended_sampling(default_model_dir()), q.parse_args([]))
    setting = {"mode": "kvcache", "sink_blocks": 0, "window_blocks": 3}
    forced = DriftThresholds(**{s: 0.0 for s in SIGNALS}, reference_chunks=2, smooth_chunks=1, cooldown_chunks=3)
    block = max(1, pipe.model.num_frame_per_block)

    def run(frames, checkpoint=None):
        return q.long_run(pipe, STILL, setting, "recache", forced, sampling, block, 64, frames, WINDOW, FPS, seed=5,
                          on_progress=lambda partial: None, progress_every_s=0.0, checkpoint=checkpoint)

    whole = run(96)
    checkpoint = q.LongCheckpoint(tmp_path / "run.snapshot.npz", {"run": "a"}, "demo")
    first = run(48, checkpoint)
    saved_at = q.LongCheckpoint(checkpoint.path, {"run": "a"}, "demo").load().state["quality"]["made"]
    assert 0 < saved_at < first["frames"] < 96
    resumed = run(96, checkpoint)
    assert resumed["resumed_at_frames"] == [saved_at] and resumed["frames"] == whole["frames"]
    assert resumed["windows"] == whole["windows"] and whole["drift_final"]["reanchors"] >= 2
    assert resumed["drift_final"] == whole["drift_final"]
    with pytest.raises(SystemExit, match="remove it to start this run over"):
        run(96, q.LongCheckpoint(checkpoint.path, {"run": "b"}, "demo"))
