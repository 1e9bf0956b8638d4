"""benchmarks/quality.py: the switch-latency bookkeeping, on world-rendered streams whose delay is known.

A stand-in stream renders the demo world itself (the detector reads it ~perfectly) and keeps showing
the old prompt for a chosen number of frames after set_prompt; the benchmark must report that delay,
in frames and in each run's own chunks.
"""
from __future__ import annotations

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

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
