"""Quality of endless streams: prompt adherence, stability over stream time, prompt-switch latency, drift.

Scores a model folder's streams with the demo world's detector (skyrt_demo.detector),
for mode="kvcache" under several sink / window ring sizes and for mode="window":
- adherence: held-out prompt combinations (never seen in training), the first ~2 s of a stream each,
  read by the detector (background, colour, shape, motion, camera) -> fraction of attributes right;
- stability: one long stream per setting, cut into 2 s windows; adherence and frame statistics per
  window, summarised per stream minute (at --fps, 24 by default: 1440 frames a minute);
- drift: per window, the change of frame statistics (mean colour, luminance spread, edge energy,
  frame-to-frame change) against the stream's first window and against a ground-truth world clip
  of the same prompt;
- switch latency: stream prompt A, call stream.set_prompt(B) (with and without recache in kvcache
  mode), count frames (and chunks) until the per-frame reading (background, colour, shape) shows B
  in at least 6 of 8 consecutive frames;
- shape grid (`--shape-grid`, its own report): every colour x shape pair, standing still on a black
  background, at a stream's start: which shape the detector reads, per shape and as a confusion table
  (held-out adherence samples 8 prompts; the grid shows which shape a model cannot draw, in any colour).
Also records generated frames per second of every run (wall clock, this machine, as loaded as it is).

    python benchmarks/quality.py                       # the trained demo model (see --model)
    python benchmarks/quality.py --model DIR --stream-minutes 2 --clips 8
    python benchmarks/quality.py --quick               # seconds, for a smoke check
    python benchmarks/quality.py --settings default --stream-frames 21440   # the 20,000-frame target
    python benchmarks/quality.py --merge a.json b.json # one report from parallel runs of other --settings
    python benchmarks/quality.py --shape-grid          # colour x shape grid -> results/quality_shapes.json
    python benchmarks/quality.py --long --long-frames 100000 --variants default,default_reanchor
                                                       # long streams -> results/quality_long.json + .png
    python benchmarks/quality.py --long --merge a.json b.json   # one long report from parallel --long runs

--long: one long stream of the stability prompt per variant (a cache setting, with or without the
drift monitor's re-anchoring, runtime/drift.py), adherence per stream minute (2 s windows read by the
detector), first / last / worst minute, the drift monitor's signals per minute and its re-anchors.
Variants (LONG_VARIANTS): default (the model's recommended kvcache setting, reanchor off),
default_reanchor (reanchor="recache", default thresholds), default_forced (re-anchors every
cooldown: thresholds 0, what re-anchoring does by itself), window, sink1 (kv_sink1_win3), sink1_reanchor.
Per minute it also records which attributes the detector read right, and per variant a "model_cap"
reading: the attributes already wrong in the first minute (what the model draws for the prompt before
any drift) and the adherence ceiling they leave. `--backend onnxruntime` runs the stream through the
exported graphs (made on first use; cheaper per frame on a CPU) after checking that its first
--check-frames frames are torch's (within BACKEND_CHECK_MAX_LEVELS uint8 levels, else it stops). Every
--partial-seconds the report so far is written (atomically, marked "partial"), so an interrupted run
leaves a valid report of the frames it reached; with --checkpoint-dir the stream is snapshotted there at
each of those writes (runtime/snapshot.py, drift monitor included) and the same command run again resumes
it, frame for frame the uninterrupted stream, so a 100k-frame run may span several processes:

    nice -n 19 python benchmarks/quality.py --long --long-frames 100800 --backend onnxruntime \
        --variants default --checkpoint-dir CKPT --out results/quality_long_default.json &   # one process per variant
    python benchmarks/quality.py --long --merge results/quality_long_default.json \
        results/quality_long_default_reanchor.json --out results/quality_long.json

Writes benchmarks/results/quality.json and quality.png (needs matplotlib for the plot).
--model defaults to skyrt's built-in demo model (skyrt-demo-world-v6, shipped in the package).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

# The demo world and its detector live in the checkout's demo/ folder (package skyrt_demo), which is
# not installed with skyrt: this script runs from a checkout.
DEMO_PACKAGE = Path(__file__).resolve().parents[1] / "demo"
if str(DEMO_PACKAGE) not in sys.path:
    sys.path.insert(0, str(DEMO_PACKAGE))

RESULTS = Path(__file__).parent / "results"
SWITCH_WINDOW, SWITCH_HITS = 8, 6  # B must show in >= 6 of 8 consecutive frames
STATS = ("mean_r", "mean_g", "mean_b", "luma_std", "edge_energy", "frame_change")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the trained demo model)")
    p.add_argument("--size", type=int, default=128, help="frame height = width")
    p.add_argument("--clips", type=int, default=8, help="held-out prompts per setting")
    p.add_argument("--clip-seconds", type=float, default=2.0, help="video per adherence clip")
    p.add_argument("--stream-minutes", type=float, default=1.0, help="stream time per setting for stability")
    p.add_argument("--stream-frames", type=int, default=None,
                   help="stream length in frames (overrides --stream-minutes; 21440 = 20,000 frames + a minute)")
    p.add_argument("--switches", type=int, default=3, help="prompt switches per setting")
    p.add_argument("--fps", type=int, default=24, help="frames per second of stream time")
    p.add_argument("--window-seconds", type=float, default=2.0, help="stability window")
    p.add_argument("--settings", default="all", help="comma list of setting names (see SETTINGS) or 'all'")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's recommendation)")
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    p.add_argument("--shape-grid", action="store_true",
                   help="only the colour x shape grid, on the default setting (writes results/quality_shapes.json)")
    p.add_argument("--out", type=Path, default=None, help="report path (default: results/quality.json, or "
                   "results/quality_shapes.json with --shape-grid)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="merge reports of parallel runs (different --settings, or --long --variants) into --out, and plot")
    p.add_argument("--long", action="store_true", help="long streams per variant (writes results/quality_long.json)")
    p.add_argument("--long-frames", type=int, default=100_000, help="--long: frames per variant's stream")
    p.add_argument("--long-seconds", type=float, default=None,
                   help="--long: wall-clock budget per variant; the stream stops at whichever comes first (frames or time)")
    p.add_argument("--variants", default="default,default_reanchor", help=f"--long: comma list of {list(LONG_VARIANTS)}")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"),
                   help="--long: the backend that runs the stream (onnxruntime: the exported graphs, made on first "
                        "use; the first --check-frames frames are compared with the torch stream first)")
    p.add_argument("--check-frames", type=int, default=96,
                   help="--long --backend onnxruntime: frames of the default stream compared with torch's (0: none)")
    p.add_argument("--partial-seconds", type=float, default=300.0,
                   help="--long: write the report so far (marked partial) every this many seconds of a run")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="--long: snapshot each variant's stream here at every partial report, and resume from the "
                        "snapshot found there (the same run's only: another run's is refused); a run killed at any "
                        "point continues where its last snapshot was, frame for frame the uninterrupted stream")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / ("quality_shapes.json" if args.shape_grid else "quality_long.json" if args.long
                              else "quality.json")
    if args.quick:
        args.clips, args.stream_minutes, args.switches, args.size = 1, 96 / (60 * args.fps), 1, min(args.size, 64)
    return args


# ----------------------------------------------------------------------------------------------
# Settings


def settings_for(block: int, recommended: dict) -> tuple[dict[str, dict], str]:
    """The rollouts compared: kvcache ring sizes (in blocks), the window mode, and the model's
    recommended setting (what `skyrt serve` runs by default); returns them and the default's name."""
    window_frames = 4 * block  # latent frames of a window (block-aligned)
    overlap = 2 * block
    settings = {
        "kv_sink0_win2": dict(mode="kvcache", sink_blocks=0, window_blocks=2),
        "kv_sink0_win4": dict(mode="kvcache", sink_blocks=0, window_blocks=4),
        "kv_sink1_win3": dict(mode="kvcache", sink_blocks=1, window_blocks=3),
        "kv_sink1_win8": dict(mode="kvcache", sink_blocks=1, window_blocks=8),
        "window": dict(mode="window", base_num_frames=1 + 4 * (window_frames - 1),
                       overlap_history=1 + 4 * (overlap - 1), overlap_carry="latent", ar_step=0),
    }
    if recommended.get("mode", "kvcache") != "kvcache":
        return settings, "window"
    sink, win = recommended.get("sink_blocks", 1), recommended.get("window_blocks", 8)
    name = f"kv_sink{sink}_win{win}"
    settings.setdefault(name, dict(mode="kvcache", sink_blocks=sink, window_blocks=win))
    return settings, name


def sampling_defaults(recommended: dict, args) -> dict:
    """Steps / shift / guidance: the model's demo_model.json recommendation, overridden by flags."""
    base = {"num_inference_steps": 4, "shift": 2.0, "guidance_scale": 1.0, "ar_step": 2}
    base.update({k: recommended[k] for k in base if k in recommended})
    for key, flag in (("num_inference_steps", args.steps), ("shift", args.shift), ("guidance_scale", args.guidance_scale)):
        if flag is not None:
            base[key] = flag
    return base


def open_stream(pipe, prompt: str, setting: dict, sampling: dict, block: int, size: int, seed: int, max_chunks=None):
    kwargs = {**sampling, **setting}
    if kwargs["mode"] == "window":
        kwargs["ar_step"] = setting.get("ar_step", 0)
    return pipe.stream(prompt, causal_block_size=block, height=size, width=size, seed=seed, max_chunks=max_chunks,
                       **kwargs)


# ----------------------------------------------------------------------------------------------
# Measurements


def frame_stats(frames: np.ndarray) -> dict[str, float]:
    """Statistics of frames uint8 [T, H, W, 3] that drift shows up in."""
    x = frames.astype(np.float32)
    luma = x @ np.array([0.299, 0.587, 0.114], np.float32)  # [T, H, W]
    edges = np.abs(np.diff(luma, axis=1)).mean() + np.abs(np.diff(luma, axis=2)).mean()
    change = float(np.abs(np.diff(luma, axis=0)).mean()) if len(frames) > 1 else 0.0
    mean = x.mean(axis=(0, 1, 2))
    return {"mean_r": float(mean[0]), "mean_g": float(mean[1]), "mean_b": float(mean[2]),
            "luma_std": float(luma.std()), "edge_energy": float(edges), "frame_change": change}


def drift(stats: dict, ref: dict) -> dict[str, float]:
    """Colour distance (RGB levels) and ratios of spread, edges and motion against a reference."""
    colour = float(np.linalg.norm([stats[k] - ref[k] for k in ("mean_r", "mean_g", "mean_b")]))
    ratio = lambda k: float(stats[k] / ref[k]) if ref[k] > 1e-6 else float("nan")  # noqa: E731
    return {"colour_distance": colour, "luma_std_ratio": ratio("luma_std"), "edge_ratio": ratio("edge_energy"),
            "change_ratio": ratio("frame_change")}


def take_frames(stream, count: int) -> np.ndarray:
    """At least `count` frames from a stream (whole chunks), then close it: uint8 [T, H, W, 3]."""
    chunks, made = [], 0
    for chunk in stream:
        chunks.append(chunk)
        made += len(chunk)
        if made >= count:
            break
    stream.close()
    return np.concatenate(chunks)


def adherence_run(pipe, prompts, setting, sampling, block, size, clip_frames, seed) -> dict:
    from skyrt_demo.detector import score_clip

    scores, frames_made, seconds = [], 0, 0.0
    for k, attrs in enumerate(prompts):
        t0 = time.perf_counter()
        frames = take_frames(open_stream(pipe, attrs.prompt, setting, sampling, block, size, seed + k), clip_frames)
        seconds += time.perf_counter() - t0
        frames_made += len(frames)
        scores.append(score_clip(frames, attrs))
    names = list(scores[0].correct)
    return {"adherence": float(np.mean([s.adherence for s in scores])),
            "all_correct": float(np.mean([s.all_correct for s in scores])),
            "per_attribute": {n: float(np.mean([s.correct[n] for s in scores])) for n in names},
            "frames_per_clip": frames_made // max(1, len(prompts)),
            "generated_fps": frames_made / seconds if seconds else None,
            "clips": [s.as_dict() for s in scores]}


def shape_grid_run(pipe, setting, sampling, block, size, clip_frames, seed, colours=None) -> dict:
    """Every colour x shape pair ("still" on a black background), the first `clip_frames` of a stream each:
    the shape the detector reads (by vote over the clip), per shape and as a confusion table.

    `colours` limits the grid (default: every named colour). Pairs that are held out of training are marked.
    """
    from skyrt_demo.detector import score_clip
    from skyrt_demo.world import COLOURS, SHAPES, Attributes, split_of

    cells = []
    for colour in colours or list(COLOURS):
        for shape in SHAPES:
            attrs = Attributes(shape, colour, "still", "black")
            frames = take_frames(open_stream(pipe, attrs.prompt, setting, sampling, block, size, seed), clip_frames)
            read = score_clip(frames, attrs).read["shape"]
            cells.append({"colour": colour, "shape": shape, "read": read, "split": split_of(attrs)})
    confusion = {s: {} for s in SHAPES}  # true shape -> {read shape (or "none"): count}
    for c in cells:
        key = c["read"] or "none"
        confusion[c["shape"]][key] = confusion[c["shape"]].get(key, 0) + 1
    right = [c["read"] == c["shape"] for c in cells]
    return {"pairs": len(cells), "correct": int(sum(right)),
            "per_shape": {s: float(np.mean([c["read"] == s for c in cells if c["shape"] == s])) for s in SHAPES},
            "heldout_correct": int(sum(r for r, c in zip(right, cells) if c["split"] == "heldout")),
            "heldout_pairs": sum(c["split"] == "heldout" for c in cells),
            "confusion": confusion, "cells": cells}


def stability_run(pipe, attrs, setting, sampling, block, size, total_frames, window, fps, seed) -> dict:
    """One long stream of `attrs`: per window adherence, statistics and drift; summarised per minute."""
    from skyrt_demo.detector import score_clip
    from skyrt_demo.world import render_clip

    reference = frame_stats(render_clip(attrs, 1 + 4 * ((window - 1) // 4), size, size, seed=seed).frames)
    stream = open_stream(pipe, attrs.prompt, setting, sampling, block, size, seed)
    buffer, made, windows = [], 0, []
    first = None
    t0 = time.perf_counter()
    for chunk in stream:
        buffer.append(chunk)
        made += len(chunk)
        pending = np.concatenate(buffer)
        while len(pending) >= window:
            clip, pending = pending[:window], pending[window:]
            start = made - len(pending) - window
            stats = frame_stats(clip)
            first = first or stats
            score = score_clip(clip, attrs)
            windows.append({"start_frame": start, "minute": start / (60 * fps), "adherence": score.adherence,
                            "correct": score.correct, "stats": stats, "drift_vs_first": drift(stats, first),
                            "drift_vs_truth": drift(stats, reference)})
        buffer = [pending] if len(pending) else []
        if made >= total_frames:
            break
    seconds = time.perf_counter() - t0
    stream.close()
    per_minute = {}
    for w in windows:
        per_minute.setdefault(int(w["minute"]), []).append(w)
    summary = [{"minute": m, "windows": len(ws), "adherence": float(np.mean([w["adherence"] for w in ws])),
                "colour_drift_vs_first": float(np.mean([w["drift_vs_first"]["colour_distance"] for w in ws])),
                "edge_ratio_vs_truth": float(np.nanmean([w["drift_vs_truth"]["edge_ratio"] for w in ws])),
                "change_ratio_vs_truth": float(np.nanmean([w["drift_vs_truth"]["change_ratio"] for w in ws]))}
               for m, ws in sorted(per_minute.items())]
    # The first minute against the last minute of the stream (for a 20,000-frame target: run
    # --stream-frames 21440 so the last minute starts at frame 20,000).
    minute = 60 * fps
    first = [w["adherence"] for w in windows if w["start_frame"] + window <= minute]
    last_start = max(0, made - minute)
    last = [w["adherence"] for w in windows if w["start_frame"] >= last_start]
    first_mean, last_mean = float(np.mean(first)), float(np.mean(last))
    return {"prompt": attrs.prompt, "frames": made, "generated_fps": made / seconds, "reference_stats": reference,
            "adherence_first_minute": first_mean, "adherence_last_minute": last_mean,
            "last_minute_start_frame": last_start, "drop_points": 100 * (first_mean - last_mean),
            "per_minute": summary, "windows": windows}


SWITCH_KEYS = ("background", "colour", "shape")  # what the latency target reads
# A second reading without the shape: a model that draws the shape as a blob never "switches" by the
# first, yet its background and colour may follow the new prompt at once; this tells the two apart.
SWITCH_KEYS_NO_SHAPE = ("background", "colour")


def switch_latency(frames: np.ndarray, target, keys: tuple[str, ...] = SWITCH_KEYS) -> int | None:
    """First frame of `frames` from which the `keys` attributes of `target` show in >= SWITCH_HITS of
    SWITCH_WINDOW consecutive frames (None: never)."""
    from skyrt_demo.detector import read_frame_attributes

    want = {k: getattr(target, k) for k in keys}
    readings = [read_frame_attributes(f) for f in frames]
    hits = np.array([all(r.get(k) == v for k, v in want.items()) for r in readings], dtype=np.int32)
    if len(hits) < SWITCH_WINDOW:
        return None
    counts = np.convolve(hits, np.ones(SWITCH_WINDOW, dtype=np.int32), mode="valid")
    good = np.flatnonzero(counts >= SWITCH_HITS)
    return int(good[0]) if len(good) else None


def switch_run(pipe, pairs, setting, sampling, block, size, warm_chunks, after_frames, recache, seed) -> dict:
    results = []
    for k, (a, b) in enumerate(pairs):
        stream = open_stream(pipe, a.prompt, setting, sampling, block, size, seed + k)
        for _ in range(warm_chunks):
            next(stream)
        stream.set_prompt(b.prompt, recache=recache)
        chunks, made = [], 0
        while made < after_frames:
            chunk = next(stream)
            chunks.append(chunk)
            made += len(chunk)
        stream.close()
        frames = np.concatenate(chunks)
        latency = switch_latency(frames, b)
        no_shape = switch_latency(frames, b, SWITCH_KEYS_NO_SHAPE)
        per_chunk = len(chunks[0])  # this run's chunk length (runs need not share one)
        results.append({"from": a.prompt, "to": b.prompt, "latency_frames": latency,
                        "latency_frames_without_shape": no_shape,
                        "latency_chunks": None if latency is None else latency / per_chunk,
                        "latency_chunks_without_shape": None if no_shape is None else no_shape / per_chunk,
                        "chunk_frames": per_chunk})
    return {"recache": recache, "switched": found_share(results, "latency_frames"),
            "mean_latency_frames": mean_found(results, "latency_frames"),
            "mean_latency_chunks": mean_found(results, "latency_chunks"),
            "switched_without_shape": found_share(results, "latency_frames_without_shape"),
            "mean_latency_chunks_without_shape": mean_found(results, "latency_chunks_without_shape"),
            "runs": results}


def found_share(results: list[dict], key: str) -> float:
    """The fraction of runs whose `key` latency was found (the new prompt was read at all)."""
    return sum(r[key] is not None for r in results) / len(results)


def mean_found(results: list[dict], key: str) -> float | None:
    """Mean of the `key` latencies that were found (None: none was)."""
    values = [r[key] for r in results if r[key] is not None]
    return float(np.mean(values)) if values else None


def switch_pairs(rng, count):
    """Held-out prompt pairs that differ in background, colour and shape (visible frame by frame)."""
    from skyrt_demo.world import combinations

    heldout = combinations("heldout")
    pairs = []
    while len(pairs) < count:
        a, b = (heldout[int(i)] for i in rng.choice(len(heldout), size=2, replace=False))
        if a.background != b.background and a.colour != b.colour and a.shape != b.shape:
            pairs.append((a, b))
    return pairs


# ----------------------------------------------------------------------------------------------
# Long streams (--long): adherence per minute, with and without the drift monitor's re-anchoring

# variant -> (setting name, or "default" for the model's recommended one; reanchor; drift thresholds)
LONG_VARIANTS = {
    "default": ("default", "off", None),
    "default_reanchor": ("default", "recache", None),
    "default_forced": ("default", "recache", "forced"),
    "window": ("window", "off", None),
    "sink1": ("kv_sink1_win3", "off", None),
    "sink1_reanchor": ("kv_sink1_win3", "recache", None),
}


def forced_thresholds():
    """Every signal's threshold at 0: the monitor re-anchors once per cooldown (what re-anchoring does by itself)."""
    from skyrt.runtime.drift import SIGNALS, DriftThresholds

    return DriftThresholds(**{s: 0.0 for s in SIGNALS})


class LongCheckpoint:
    """A long run's resumable state in one snapshot file (runtime/snapshot.py): the stream's whole state
    (FrameStream.export_state: rollout core, noise, decoder, drift monitor) plus this harness's own (frames
    made, the windows read so far, the frames of the window being filled, seconds run). Written at every
    partial report; a run started with the same file continues the stream where the snapshot left it,
    frame for frame the uninterrupted stream (tests/test_resume.py), so one 100k-frame run can span
    several processes. `identity` (prompt, setting, sampling, size, seed, backend, ...) and the model are
    checked when it is read: a snapshot of another run is refused, never continued."""

    def __init__(self, path: Path, identity: dict, model: str):
        self.path, self.identity, self.model = Path(path), identity, model

    def load(self):
        """The checked snapshot, or None when there is none yet. Another run's snapshot is an error."""
        from skyrt.runtime.snapshot import SnapshotRefused, read_snapshot

        if not self.path.exists():
            return None
        try:
            return read_snapshot(self.path, self.identity, self.model)
        except SnapshotRefused as e:
            raise SystemExit(f"{self.path}: {e}; remove it to start this run over, or pass another --checkpoint-dir")

    def save(self, stream, harness: dict, pending: np.ndarray) -> None:
        """Snapshot the stream (suspended between chunks) with the harness state; atomic."""
        from skyrt.runtime.snapshot import write_snapshot

        state, arrays = stream.export_state()
        state["quality"] = harness
        arrays["quality/pending"] = pending
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_snapshot(self.path, state, arrays, self.identity, self.model)


def long_run(pipe, attrs, setting: dict, reanchor: str, thresholds, sampling, block, size, total_frames, window,
             fps, seed, budget_s: float | None = None, on_progress=None, progress_every_s: float = 300.0,
             checkpoint: LongCheckpoint | None = None) -> dict:
    """One stream of `attrs` for `total_frames`: per 2 s window the detector's adherence (and which
    attributes it read right) and the drift monitor's status; per stream minute adherence, signals and
    re-anchors; first / last / worst minute.

    `on_progress(result)`, when given, is called every `progress_every_s` seconds with the result so far
    (marked "partial": True), so that a run stopped at any point leaves a valid report behind; with a
    `checkpoint` the stream is snapshotted just before each, and a checkpoint that exists is resumed
    (frames, windows and seconds continue from it; "resumed_at_frames" lists where)."""
    from skyrt_demo.detector import score_clip

    kwargs = {**sampling, **setting, "reanchor": reanchor}
    if kwargs["mode"] == "window":
        kwargs["ar_step"] = setting.get("ar_step", 0)
    resume = checkpoint.load() if checkpoint is not None else None
    harness = dict(resume.state["quality"]) if resume is not None else {"made": 0, "windows": [], "seconds": 0.0,
                                                                         "resumed_at_frames": []}
    if resume is not None:
        harness["resumed_at_frames"] = [*harness["resumed_at_frames"], harness["made"]]
    stream = pipe.stream(attrs.prompt, causal_block_size=block, height=size, width=size, seed=seed, drift=thresholds,
                         resume=resume, **kwargs)
    made, windows = harness["made"], harness["windows"]
    pending_saved = resume.arrays["quality/pending"] if resume is not None else np.zeros((0, size, size, 3), np.uint8)
    buffer = [pending_saved] if len(pending_saved) else []
    t0 = time.perf_counter() - harness["seconds"]  # seconds run before a resume count too
    last_progress = time.perf_counter()
    for chunk in stream:
        buffer.append(chunk)
        made += len(chunk)
        pending = np.concatenate(buffer)
        while len(pending) >= window:
            clip, pending = pending[:window], pending[window:]
            start = made - len(pending) - window
            status = stream.drift_status()
            score = score_clip(clip, attrs)
            windows.append({"start_frame": start, "minute": start // (60 * fps), "adherence": score.adherence,
                            "correct": score.correct, "signals": status["signals"],
                            "reanchors": status["reanchors"], "drifted_chunks": status["drifted_chunks"]})
        buffer = [pending] if len(pending) else []
        if made >= total_frames or (budget_s is not None and time.perf_counter() - t0 > budget_s):
            break
        now = time.perf_counter()
        if on_progress is not None and windows and now - last_progress >= progress_every_s:
            if checkpoint is not None:
                pending = np.concatenate(buffer) if buffer else np.zeros((0, size, size, 3), np.uint8)
                checkpoint.save(stream, {**harness, "made": made, "windows": windows, "seconds": now - t0}, pending)
            on_progress({**long_result(attrs, setting, reanchor, made, now - t0, stream.drift_status(), windows, window,
                                       fps, partial=True), "resumed_at_frames": harness["resumed_at_frames"]})
            last_progress = now
    seconds = time.perf_counter() - t0
    final = stream.drift_status()
    stream.close()
    return {**long_result(attrs, setting, reanchor, made, seconds, final, windows, window, fps, partial=False),
            "resumed_at_frames": harness["resumed_at_frames"]}


def long_result(attrs, setting: dict, reanchor: str, made: int, seconds: float, drift_status: dict,
                windows: list[dict], window: int, fps: int, partial: bool) -> dict:
    """A long stream's result from its windows so far: `partial` marks a run that is still going."""
    return {"prompt": attrs.prompt, "setting": setting, "reanchor": reanchor, "frames": made, "seconds": seconds,
            "generated_fps": made / seconds if seconds else None, "partial": partial, "drift_final": drift_status,
            "loadavg_end": list(os.getloadavg()), **per_minute_summary(windows, made, window, fps),
            "windows": windows}


def per_minute_summary(windows: list[dict], made: int, window: int, fps: int) -> dict:
    """Adherence per whole stream minute (a partial last minute is left out of first/last/worst), the
    monitor's mean signals and re-anchors per minute; the first-minute and last-minute figures and the drop."""
    minute = 60 * fps
    full_minutes = made // minute
    rows = []
    for m in sorted({w["minute"] for w in windows}):
        ws = [w for w in windows if w["minute"] == m]
        before = [w for w in windows if w["minute"] < m]
        signals = {k: float(np.mean([w["signals"][k] for w in ws if w["signals"][k] is not None]))
                   if any(w["signals"][k] is not None for w in ws) else None for k in ws[0]["signals"]}
        rows.append({"minute": m, "windows": len(ws), "full": m < full_minutes,
                     "adherence": float(np.mean([w["adherence"] for w in ws])), "signals": signals,
                     "per_attribute": attribute_rates(ws),
                     "reanchors": ws[-1]["reanchors"] - (before[-1]["reanchors"] if before else 0)})
    full = [r for r in rows if r["full"]] or rows
    first, last = full[0], full[-1]
    worst = min(full, key=lambda r: r["adherence"])
    return {"minutes": len(full), "adherence_first_minute": first["adherence"], "adherence_last_minute": last["adherence"],
            "worst_minute": {"minute": worst["minute"], "adherence": worst["adherence"]},
            "min_minute_adherence": worst["adherence"], "drop_points": 100 * (first["adherence"] - last["adherence"]),
            "model_cap": model_cap(first, last), "per_minute": rows}


def attribute_rates(windows: list[dict]) -> dict[str, float] | None:
    """Per attribute, the fraction of `windows` the detector read right (None: windows without readings)."""
    if not windows or any("correct" not in w for w in windows):
        return None
    return {k: float(np.mean([w["correct"][k] for w in windows])) for k in windows[0]["correct"]}


def model_cap(first: dict, last: dict) -> dict:
    """Is the 0.90 target out of reach from the stream's first minute on (the model, not drift)?

    Attributes read right in under half of the first minute's windows are "wrong from the start": what
    the model draws for this prompt, before any drift could set in. `ceiling` is the adherence the stream
    would have with only those attributes wrong (every other attribute right)."""
    rates = first.get("per_attribute")
    if rates is None:
        return {"capped_by_model": None, "why": "no per-attribute readings in this report"}
    failing = {k: v for k, v in rates.items() if v < 0.5}
    ceiling = 1.0 - len(failing) / len(rates)
    lost_later = {k: round(rates[k] - last["per_attribute"][k], 4) for k in rates
                  if last.get("per_attribute") and rates[k] - last["per_attribute"][k] > 0.05}
    return {"capped_by_model": first["adherence"] < 0.90 and ceiling < 0.90 + 1e-9,
            "failing_from_first_minute": failing, "ceiling": ceiling,
            "first_minute_per_attribute": rates, "worse_in_last_minute": lost_later}


def long_targets(result: dict) -> dict:
    """The issue's targets for a long stream: >= 0.90 in every minute, <= 5 points first-to-last drop."""
    return {"adherence>=0.90_every_minute": result["min_minute_adherence"] >= 0.90,
            "drop_points<=5": result["drop_points"] <= 5.0, "frames>=100000": result["frames"] >= 100_000}


# The ORT stream may differ from torch's by float rounding: one uint8 level where a value sits on a
# rounding edge. More than this is a different rollout, and the long run refuses to stand in for torch's.
BACKEND_CHECK_MAX_LEVELS = 2


def backend_check(pipe, torch_pipe, attrs, setting: dict, sampling: dict, block: int, size: int, frames: int,
                  seed: int) -> dict:
    """The first `frames` frames of `setting`'s stream on `pipe` against the same stream on `torch_pipe`
    (the reference backend): uint8 differences. Raises when they are not the same rollout."""
    clips, fps = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for p in (torch_pipe, pipe):
            t0 = time.perf_counter()
            clips.append(take_frames(open_stream(p, attrs.prompt, setting, sampling, block, size, seed), frames)[:frames]
                         .astype(np.int16))  # [T, H, W, 3]
            fps.append(len(clips[-1]) / (time.perf_counter() - t0))
    a, b = clips
    diff = np.abs(a - b)
    result = {"frames": int(len(a)), "max_abs_diff_levels": int(diff.max()), "mean_abs_diff_levels": float(diff.mean()),
              "fraction_differing": float((diff > 0).mean()), "tolerance_levels": BACKEND_CHECK_MAX_LEVELS,
              # one short stream each, one after the other, stream start included: a rough ratio only
              "torch_fps": fps[0], "backend_fps": fps[1], "backend_over_torch": fps[1] / fps[0]}
    if result["max_abs_diff_levels"] > BACKEND_CHECK_MAX_LEVELS:
        raise SystemExit(f"the --backend stream is not torch's (max difference "
                         f"{result['max_abs_diff_levels']} levels over {len(a)} frames): run --backend torch, or find "
                         "out why the export differs (tests/test_onnxruntime_backend.py)")
    return result


def write_long(pipe, label, all_settings, default_name, attrs, sampling, block, window, args, torch_pipe=None) -> int:
    """Run the --variants one after another into one report; write it (marked partial) as the runs go
    (and, with --checkpoint-dir, a resumable snapshot of each variant's stream beside it)."""
    from skyrt.runtime.snapshot import model_identity

    names = args.variants.split(",")
    unknown = [n for n in names if n not in LONG_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}: choose from {list(LONG_VARIANTS)}")
    report = {**report_header("quality_long", args, label, block, sampling, window_frames=window),
              "prompt": attrs.prompt, "default_setting": default_name, "variants": {}}
    report["machine"].update(backend=args.backend, cpu_count=os.cpu_count(), nice=os.nice(0),
                             loadavg_start=list(os.getloadavg()))
    if torch_pipe is not None and args.check_frames > 0:
        report["backend_check"] = backend_check(pipe, torch_pipe, attrs, all_settings[default_name], sampling, block,
                                                args.size, args.check_frames, args.seed)
        print(f"backend check: {args.backend} vs torch, {json.dumps(report['backend_check'])}", flush=True)
    for name in names:
        setting_name, reanchor, thresholds = LONG_VARIANTS[name]
        setting_name = default_name if setting_name == "default" else setting_name
        thresholds = forced_thresholds() if thresholds == "forced" else None
        print(f"[{name}] {setting_name}, reanchor={reanchor}: {args.long_frames} frames of '{attrs.prompt}'", flush=True)

        def progress(partial: dict, name=name, setting_name=setting_name) -> None:
            partial["setting_name"], partial["targets"] = setting_name, long_targets(partial)
            write_long_report({**report, "variants": {**report["variants"], name: partial}}, args.out, quiet=True)
            print(f"[{name}]   partial: {partial['frames']} frames, {partial['generated_fps']:.1f} fps, "
                  f"last minute {partial['adherence_last_minute']:.3f} -> {args.out.name}", flush=True)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = None
            if args.checkpoint_dir is not None:
                identity = {"benchmark": "quality_long", "variant": name, "prompt": attrs.prompt,
                            "setting": all_settings[setting_name], "reanchor": reanchor, "thresholds": repr(thresholds),
                            "sampling": sampling, "block": block, "size": args.size, "seed": args.seed,
                            "window": window, "fps": args.fps, "backend": args.backend}
                checkpoint = LongCheckpoint(args.checkpoint_dir / f"quality_long_{name}.snapshot.npz", identity,
                                            model_identity(args.model))
            result = long_run(pipe, attrs, all_settings[setting_name], reanchor, thresholds, sampling, block, args.size,
                              args.long_frames, window, args.fps, args.seed, args.long_seconds, on_progress=progress,
                              progress_every_s=args.partial_seconds, checkpoint=checkpoint)
        result["setting_name"], result["targets"] = setting_name, long_targets(result)
        report["variants"][name] = result
        print(f"[{name}]   first/last/worst minute {result['adherence_first_minute']:.3f}/"
              f"{result['adherence_last_minute']:.3f}/{result['min_minute_adherence']:.3f}, "
              f"{result['drift_final']['reanchors']} re-anchors, {result['generated_fps']:.1f} fps", flush=True)
    write_long_report(report, args.out)
    return 0


def write_long_report(report: dict, out: Path, quiet: bool = False) -> None:
    """Summarise every variant, write the report (atomically: a reader never sees half a file) and its plot."""
    from skyrt.runtime.atomic_file import write_atomically

    report["summary"] = {n: {k: v[k] for k in ("setting_name", "reanchor", "frames", "minutes", "generated_fps",
                                                "adherence_first_minute", "adherence_last_minute", "worst_minute",
                                                "drop_points", "targets")}
                         | {"reanchors": v["drift_final"]["reanchors"], "drifted_chunks": v["drift_final"]["drifted_chunks"],
                            # .get: reports from before partial writes and per-attribute readings
                            "partial": v.get("partial", False), "model_cap": v.get("model_cap")}
                         for n, v in report["variants"].items()}
    report["partial"] = any(row["partial"] for row in report["summary"].values())
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, json.dumps(report, indent=1).encode())
    drawn = plot_long(report, out.with_suffix(".png"))
    if quiet:
        return
    for name, row in report["summary"].items():
        print(f"{name:>16}: {row['frames']} frames, first/last minute {row['adherence_first_minute']:.3f}/"
              f"{row['adherence_last_minute']:.3f}, worst {row['worst_minute']}, re-anchors {row['reanchors']}, "
              f"targets {row['targets']}" + (" (still running: partial)" if row["partial"] else ""))
        cap = row["model_cap"] or {}
        if cap.get("capped_by_model"):
            print(f"{'':>16}  capped by the model: {cap['failing_from_first_minute']} read right in the first minute's "
                  f"windows (ceiling {cap['ceiling']:.2f})")
    print(f"wrote {out.name}" + (f" and {out.with_suffix('.png').name}" if drawn else "") + f" in {out.parent}")


def merge_long(paths: list[Path], out: Path) -> int:
    """One long report from --long runs of the same model over different --variants (run in parallel)."""
    reports = [json.loads(p.read_text()) for p in paths]
    merged = {**reports[0], "variants": {}, "merged_from": [p.name for p in paths],
              "machines": [r["machine"] for r in reports]}
    for path, r in zip(paths, reports):
        if r["model"] != merged["model"] or r["prompt"] != merged["prompt"]:
            raise SystemExit(f"cannot merge long reports of different models or prompts: {path.name}")
        twice = set(r["variants"]) & set(merged["variants"])
        if twice:
            raise SystemExit(f"variant(s) {sorted(twice)} are in more than one report ({path.name}): merge each once")
        merged["variants"].update(r["variants"])
    checks = {p.name: r["backend_check"] for p, r in zip(paths, reports) if "backend_check" in r}
    if checks:
        merged["backend_check"] = checks
    write_long_report(merged, out)
    return 0


def plot_long(report: dict, path: Path) -> bool:
    """Adherence per stream minute for every variant (top), the drift signals of each (bottom)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'skyrt[bench]')")
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    for name, v in report["variants"].items():
        rows = v["per_minute"]
        running = ", running" if v.get("partial") else ""
        top.plot([r["minute"] for r in rows], [r["adherence"] for r in rows], marker=".",
                 label=f"{name} ({v['frames']} frames{running}, {v['drift_final']['reanchors']} re-anchors)")
        bottom.plot([r["minute"] for r in rows], [r["signals"]["latent_mean_shift"] for r in rows], label=name)
    top.axhline(0.90, color="gray", linestyle="--", linewidth=1, label="target 0.90")
    top.set(title=f"adherence per stream minute: '{report['prompt']}'", ylabel="adherence (detector)", ylim=(0, 1.05))
    top.legend(fontsize=7)
    bottom.set(title="drift monitor: latent_mean_shift (rolling, vs the stream's first blocks)",
               xlabel=f"stream minute ({report['config']['fps']} fps)", ylabel="max channel z")
    bottom.legend(fontsize=7)
    fig.suptitle(f"skyrt long-stream quality: {report['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# Report


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    names = list(report["settings"])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    for name in names:
        ws = report["settings"][name]["stability"]["windows"]
        ax.plot([w["start_frame"] / report["config"]["fps"] for w in ws], [w["adherence"] for w in ws],
                marker=".", label=name)
    ax.set(title="adherence over stream time (2 s windows)", xlabel="stream seconds", ylabel="adherence", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for name in names:
        ws = report["settings"][name]["stability"]["windows"]
        ax.plot([w["start_frame"] / report["config"]["fps"] for w in ws],
                [w["drift_vs_first"]["colour_distance"] for w in ws], marker=".", label=name)
    ax.set(title="colour drift vs the first window", xlabel="stream seconds", ylabel="RGB distance")
    ax = axes[1, 0]
    held = [report["settings"][n]["heldout"]["adherence"] for n in names]
    ax.bar(names, held, color="tab:green")
    ax.set(title=f"held-out prompt adherence ({report['config']['clips']} clips each)", ylim=(0, 1.05))
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    ax = axes[1, 1]
    for offset, recache in ((-0.2, False), (0.2, True)):
        vals = []
        for n in names:
            sw = [s for s in report["settings"][n]["switch"] if s["recache"] == recache]
            vals.append(sw[0]["mean_latency_frames"] if sw and sw[0]["mean_latency_frames"] is not None else np.nan)
        ax.bar(np.arange(len(names)) + offset, vals, width=0.4, label=f"recache={recache}")
    ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
    ax.set(title="prompt-switch latency (frames after set_prompt)", ylabel="frames")
    for i, n in enumerate(names):
        rates = "/".join(f"{s['switched']:.0%}" for s in report["settings"][n]["switch"])
        ax.annotate(f"switched\n{rates}", (i, 0), ha="center", va="bottom", fontsize=7)  # 2 lines: bars are narrow
    ax.legend(fontsize=7)
    fig.suptitle(f"skyrt stream quality: {report['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge_long(args.merge, args.out) if args.long else merge(args.merge, args.out)
    import torch

    torch.set_num_threads(args.threads)
    import skyrt
    from skyrt_demo.world import combinations

    from skyrt.runtime.default_model import default_model_dir, recommended_sampling

    model_dir = args.model if args.model is not None else default_model_dir()
    if args.backend != "torch" and not args.long:
        raise SystemExit("--backend runs --long streams only; the other measurements run on torch")
    torch_pipe = skyrt.load(model_dir)
    # onnxruntime: the same rollout through the exported graphs (cheaper per frame on this CPU); torch's
    # pipeline stays loaded for the check of the first frames (backend_check).
    pipe = torch_pipe if args.backend == "torch" else skyrt.load(model_dir, backend=args.backend, threads=args.threads)
    block = max(1, pipe.model.num_frame_per_block)
    recommended = recommended_sampling(model_dir)
    sampling = sampling_defaults(recommended, args)
    all_settings, default_name = settings_for(block, recommended)
    names = list(all_settings) if args.settings == "all" else [
        default_name if n == "default" else n for n in args.settings.split(",")]
    unknown = [n for n in names if n not in all_settings]
    if unknown:
        raise SystemExit(f"unknown --settings {unknown}: choose from {list(all_settings)}, 'default' or 'all'")
    rng = np.random.default_rng(args.seed)
    heldout = combinations("heldout")
    prompts = [heldout[int(i)] for i in rng.choice(len(heldout), size=args.clips, replace=False)]
    pairs = switch_pairs(rng, args.switches)
    stable_prompt = prompts[0]
    fps = args.fps
    window = int(round(args.window_seconds * fps))
    clip_frames = int(args.clip_seconds * fps) + 1  # ~2 s: long enough for the motion reading
    total_frames = args.stream_frames or max(window, int(args.stream_minutes * 60 * fps))

    label = model_dir.name
    if (model_dir / "demo_model.json").is_file():
        label = json.loads((model_dir / "demo_model.json").read_text()).get("name", label)
    if args.shape_grid:
        name = default_name if args.settings == "all" else names[0]
        return write_shape_grid(pipe, label, name, all_settings[name], sampling, block, clip_frames, args)
    if args.long:
        return write_long(pipe, label, all_settings, default_name, stable_prompt, sampling, block, window, args,
                          torch_pipe=None if pipe is torch_pipe else torch_pipe)
    report = {**report_header("quality", args, label, block, sampling, window_frames=window), "settings": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the kvcache approximation warning of bidirectional models
        for name in names:
            setting = all_settings[name]
            print(f"[{name}] held-out adherence: {args.clips} clips of >= {clip_frames} frames", flush=True)
            held = adherence_run(pipe, prompts, setting, sampling, block, args.size, clip_frames, args.seed)
            print(f"[{name}]   adherence {held['adherence']:.3f}  ({held['generated_fps']:.1f} generated fps)", flush=True)
            print(f"[{name}] stability: {total_frames} frames of '{stable_prompt.prompt}'", flush=True)
            stab = stability_run(pipe, stable_prompt, setting, sampling, block, args.size, total_frames, window, fps,
                                 args.seed)
            print(f"[{name}]   per minute: " + ", ".join(f"{m['minute']}: {m['adherence']:.2f}" for m in stab["per_minute"]),
                  flush=True)
            switches = []
            for recache in ((False, True) if setting["mode"] == "kvcache" else (False,)):
                sw = switch_run(pipe, pairs, setting, sampling, block, args.size, warm_chunks=3,
                                after_frames=3 * fps, recache=recache, seed=args.seed)
                switches.append(sw)
                print(f"[{name}] switch (recache={recache}): {sw['switched']:.0%} switched, mean latency "
                      f"{sw['mean_latency_frames']} frames; without the shape {sw['switched_without_shape']:.0%}, "
                      f"{sw['mean_latency_chunks_without_shape']} chunks", flush=True)
            report["settings"][name] = {"setting": setting, "heldout": held, "stability": stab, "switch": switches}
    report["default_setting"] = default_name
    write_report(report, args.out)
    return 0


def report_header(benchmark: str, args, label: str, block: int, sampling: dict, **config) -> dict:
    """benchmark, model, machine and config (the CLI arguments, the out file by name) of a report."""
    return {"benchmark": benchmark, "model": label,
            "machine": {"platform": platform.platform(), "device": "cpu", "torch_threads": args.threads},
            "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       "out": args.out.name, "model": label, "block": block, "sampling": sampling, **config}}


def write_shape_grid(pipe, label: str, name: str, setting: dict, sampling: dict, block: int, clip_frames: int,
                     args) -> int:
    """Run the colour x shape grid on one setting, print it as a table and write its own report."""
    from skyrt_demo.world import COLOURS, SHAPES

    colours = list(COLOURS)[:2] if args.quick else None
    print(f"[{name}] shape grid: every colour x shape, still on black, {clip_frames} frames each", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        grid = shape_grid_run(pipe, setting, sampling, block, args.size, clip_frames, args.seed, colours)
    read = {(c["colour"], c["shape"]): c for c in grid["cells"]}
    print(f"{'':8}" + "".join(f"{s:>10}" for s in SHAPES) + "   (* held out of training)")
    for colour in dict.fromkeys(c["colour"] for c in grid["cells"]):
        row = [read[colour, s] for s in SHAPES]
        print(f"{colour:8}" + "".join(f"{('*' if c['split'] == 'heldout' else '') + (c['read'] or '-'):>10}" for c in row))
    print(f"right: {grid['correct']} of {grid['pairs']} pairs ({grid['heldout_correct']} of {grid['heldout_pairs']} "
          f"held out); per shape " + ", ".join(f"{s} {v:.2f}" for s, v in grid["per_shape"].items()))
    report = {**report_header("quality_shapes", args, label, block, sampling), "setting": name, "grid": grid}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out.name} in {args.out.parent}")
    return 0


def summarise(report: dict) -> None:
    """Per setting, the headline numbers; for the default setting, the targets of the demo model."""
    rows = {}
    for name, r in report["settings"].items():
        stab = r["stability"]
        switch = {("recache" if s["recache"] else "continue"): s["mean_latency_chunks"] for s in r["switch"]}
        switched = {("recache" if s["recache"] else "continue"): s["switched"] for s in r["switch"]}
        rows[name] = {"heldout_adherence": r["heldout"]["adherence"], "heldout_fps": r["heldout"]["generated_fps"],
                      "stream_frames": stab["frames"], "stream_fps": stab["generated_fps"],
                      "adherence_first_minute": stab["adherence_first_minute"],
                      "adherence_last_minute": stab["adherence_last_minute"], "drop_points": stab["drop_points"],
                      "switch_latency_blocks": switch, "switched": switched,
                      # .get: reports from before the shape-free reading existed (--merge) lack it
                      "switch_latency_blocks_without_shape": {("recache" if s["recache"] else "continue"):
                                                              s.get("mean_latency_chunks_without_shape")
                                                              for s in r["switch"]}}
    report["summary"] = rows
    default = rows.get(report.get("default_setting"))
    if default is None:
        return
    latency = default["switch_latency_blocks"].get("continue")
    report["targets"] = {
        "setting": report["default_setting"],
        "heldout_adherence>=0.90": default["heldout_adherence"] >= 0.90,
        "stream_frames>=20000+minute": default["stream_frames"] >= 20000 + 60 * report["config"]["fps"],
        "drop_points<=5": default["drop_points"] <= 5.0,
        "switch_latency_blocks<=2": latency is not None and latency <= 2.0 and default["switched"]["continue"] == 1.0,
    }


def write_report(report: dict, out: Path) -> None:
    summarise(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    png = out.with_suffix(".png")
    drawn = plot(report, png)
    for name, row in report["summary"].items():
        print(f"{name:>14}: held-out {row['heldout_adherence']:.3f}, first/last minute "
              f"{row['adherence_first_minute']:.3f}/{row['adherence_last_minute']:.3f} ({row['stream_frames']} frames), "
              f"switch {row['switch_latency_blocks']} blocks, {row['stream_fps']:.1f} fps")
    if "targets" in report:
        print("targets:", json.dumps(report["targets"]))
    print(f"wrote {out.name}" + (f" and {png.name}" if drawn else "") + f" in {out.parent}")


def merge(paths: list[Path], out: Path) -> int:
    """One report from runs of the same model and config over different --settings (e.g. run in parallel)."""
    reports = [json.loads(p.read_text()) for p in paths]
    merged = {**reports[0], "settings": {}, "merged_from": [p.name for p in paths]}
    for r in reports:
        if r["model"] != merged["model"]:
            raise SystemExit(f"cannot merge reports of different models: {r['model']} and {merged['model']}")
        merged["settings"].update(r["settings"])
    write_report(merged, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
