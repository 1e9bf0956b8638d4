"""Drift monitor: cheap signals that tell when an endless stream wanders off its prompt.

Every stream (Pipeline.stream, kvcache and window mode) feeds each chunk it yields to a DriftMonitor:
the clean latents [16, f, h, w] (model space) and, unless the stream yields latents, the decoded
frames uint8 [n, H, W, 3]. The stream's first `reference_chunks` chunks are its reference (they are
on brief as far as the model can be); after that, per chunk, a rolling mean over the last
`smooth_chunks` chunks is compared with the reference:

    latent_mean_shift   max over channels |mean_c - ref_mean_c| / ref_std_c   (content moved)
    latent_std_ratio    max over channels |log(std_c / ref_std_c)|           (contrast / noise grew or faded)
    frame_change_ratio  |log(change / ref_change)|, change = mean |luma_t - luma_t-1| (motion froze or ran wild)
    colour_distance     |mean RGB - ref mean RGB| in uint8 levels            (palette moved)

Each has a threshold (DriftThresholds); a signal above its threshold is a crossing. What a crossing
does is the stream's `reanchor` setting (runtime/request.py): "off" only counts it; "recache"
re-anchors a kvcache stream (KVRollout.recache: the cached window and the sink committed again under
the prompt), then waits `cooldown_chunks` chunks before it may act again, so one excursion is one
re-anchor. The monitor never changes what it observes: with reanchor off (or no crossing) the stream
is bit for bit the stream without it.

Costs: per chunk, per-channel mean/std of the latents and, on frames subsampled 4x in each direction,
a mean colour and a frame difference: microseconds to a few milliseconds at 544x960. A captioner
check (SkyCaptioner's on-brief reading at a low rate) is not part of it.

`status()` is plain data (JSON-safe): what /status shows under "drift" and /metrics exports.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

SIGNALS = ("latent_mean_shift", "latent_std_ratio", "frame_change_ratio", "colour_distance")
REANCHOR_POLICIES = ("off", "recache")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
PIXEL_STRIDE = 4  # frame signals read every 4th pixel in each direction: 16x cheaper, the same statistics
STD_FLOOR = 1e-3  # a channel that is flat in the reference must not divide by ~0
CHANGE_FLOOR = 0.25  # uint8 levels: a still reference (change ~0) compares on this floor, not on noise


@dataclass(frozen=True)
class DriftThresholds:
    """When a signal counts as drift, and how the monitor smooths and waits.

    The defaults sit well above what a steady stream of the built-in demo model shows (its steady
    latent_mean_shift stays under ~0.5, frame_change_ratio under ~0.5, colour_distance under ~6
    levels) and below a stream that changed scene. A threshold of math.inf switches its signal off."""

    latent_mean_shift: float = 1.5
    latent_std_ratio: float = math.log(1.6)
    frame_change_ratio: float = math.log(3.0)
    colour_distance: float = 20.0
    reference_chunks: int = 8
    smooth_chunks: int = 4
    cooldown_chunks: int = 8

    def __post_init__(self):
        for name in SIGNALS:
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ValueError(f"drift threshold {name}={getattr(self, name)!r} must be >= 0 (math.inf: off)")
        for name in ("reference_chunks", "smooth_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 (chunks of the stream)")
        if self.cooldown_chunks < 0:
            raise ValueError(f"cooldown_chunks={self.cooldown_chunks} must be >= 0")

    def of(self, signal: str) -> float:
        return getattr(self, signal)


@dataclass
class ChunkStats:
    """What one chunk contributes: per-channel latent mean / std [16], and frame figures (None without frames)."""

    latent_mean: np.ndarray
    latent_std: np.ndarray
    mean_rgb: np.ndarray | None = None  # [3] uint8 levels
    frame_change: float | None = None  # mean |luma_t - luma_(t-1)| in uint8 levels


def chunk_stats(latents: np.ndarray, frames: np.ndarray | None, previous_frame: np.ndarray | None) -> ChunkStats:
    """Statistics of a chunk: latents [C, f, h, w]; frames uint8 [n, H, W, 3] (or None); previous_frame
    the last frame of the chunk before [H', W', 3] (subsampled, float32), so the change spans chunk edges."""
    z = np.asarray(latents, np.float32)
    flat = z.reshape(z.shape[0], -1)
    stats = ChunkStats(flat.mean(axis=1), flat.std(axis=1))
    if frames is None or len(frames) == 0:
        return stats
    x = np.asarray(frames[:, ::PIXEL_STRIDE, ::PIXEL_STRIDE], np.float32)  # [n, H/4, W/4, 3]
    stats.mean_rgb = x.mean(axis=(0, 1, 2))
    luma = x @ LUMA  # [n, H/4, W/4]
    if previous_frame is not None:
        luma = np.concatenate([(previous_frame @ LUMA)[None], luma])
    stats.frame_change = float(np.abs(np.diff(luma, axis=0)).mean()) if len(luma) > 1 else None
    return stats


class DriftMonitor:
    """Watches one stream (see the module docstring); `observe` once per chunk, from the stream's thread;
    `status()` from any thread."""

    def __init__(self, thresholds: DriftThresholds | None = None, policy: str = "off"):
        if policy not in REANCHOR_POLICIES:
            raise ValueError(f"reanchor={policy!r} is not one of {', '.join(map(repr, REANCHOR_POLICIES))}")
        self.thresholds = thresholds or DriftThresholds()
        self.policy = policy
        self._lock = threading.Lock()
        self._reference: list[ChunkStats] = []
        self._ref: dict | None = None  # reference figures, once the first chunks are in
        self._recent: deque[ChunkStats] = deque(maxlen=self.thresholds.smooth_chunks)
        self._last_frame: np.ndarray | None = None
        self.chunks = 0
        self.signals: dict[str, float | None] = {s: None for s in SIGNALS}
        self.crossings = {s: 0 for s in SIGNALS}  # chunks on which each signal was above its threshold
        self.drifted_chunks = 0  # chunks with any signal above its threshold
        self.reanchors = 0
        self._cooldown = 0

    # ------------------------------------------------------------------ observing
    def observe(self, latents: np.ndarray, frames: np.ndarray | None = None) -> bool:
        """Take one chunk (latents [C, f, h, w], frames uint8 [n, H, W, 3] or None). True when the
        policy says re-anchor now (the caller does it, then calls `reanchored()`)."""
        stats = chunk_stats(latents, frames, self._last_frame)
        if frames is not None and len(frames):
            self._last_frame = np.asarray(frames[-1, ::PIXEL_STRIDE, ::PIXEL_STRIDE], np.float32)
        with self._lock:
            self.chunks += 1
            if self._ref is None:
                self._reference.append(stats)
                if len(self._reference) == self.thresholds.reference_chunks:
                    self._ref = _reference_figures(self._reference)
                return False
            self._recent.append(stats)
            if len(self._recent) < self.thresholds.smooth_chunks:  # one chunk's statistics are too noisy to act on
                return False
            self.signals = _signals(self._ref, list(self._recent))
            over = [s for s, v in self.signals.items() if v is not None and v > self.thresholds.of(s)]
            for s in over:
                self.crossings[s] += 1
            self.drifted_chunks += bool(over)
            if self._cooldown > 0:
                self._cooldown -= 1
                return False
            return bool(over) and self.policy != "off"

    def reanchored(self) -> None:
        """The caller re-anchored the stream: count it, forget the smoothed past (it showed the drift; the
        signals read again once `smooth_chunks` new chunks are in), wait the cooldown before acting again.
        The reference stays: it is the brief."""
        with self._lock:
            self.reanchors += 1
            self._recent.clear()
            self._cooldown = self.thresholds.cooldown_chunks

    # ------------------------------------------------------------------ snapshots
    def export_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(state, arrays) of the monitor for a stream snapshot (runtime/snapshot.py): its counters, the
        reference chunks (or figures), the smoothed recent chunks and the last frame, so a resumed stream
        reads the same signals and re-anchors at the same chunks as the uninterrupted one."""
        with self._lock:
            state = {"policy": self.policy, "thresholds": asdict(self.thresholds), "chunks": self.chunks,
                     "signals": dict(self.signals), "crossings": dict(self.crossings),
                     "drifted_chunks": self.drifted_chunks, "reanchors": self.reanchors, "cooldown": self._cooldown,
                     "reference": len(self._reference), "recent": len(self._recent)}
            arrays = {}
            for kind, chunks in (("reference", self._reference), ("recent", list(self._recent))):
                for i, c in enumerate(chunks):
                    arrays.update(_chunk_arrays(f"{kind}/{i}", c))
            if self._last_frame is not None:
                arrays["last_frame"] = self._last_frame
            return state, arrays

    def import_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        """Continue from export_state's figures. A monitor of other thresholds or policy refuses: its
        signals would not mean what the saved ones did."""
        if state["policy"] != self.policy or state["thresholds"] != asdict(self.thresholds):
            raise ValueError(f"the snapshot's drift monitor ran reanchor={state['policy']!r} with thresholds "
                             f"{state['thresholds']}; this stream's is reanchor={self.policy!r} with "
                             f"{asdict(self.thresholds)}: resume with the same settings or start fresh")
        with self._lock:
            self._reference = [_chunk_from(arrays, f"reference/{i}") for i in range(state["reference"])]
            self._ref = (_reference_figures(self._reference)
                         if len(self._reference) == self.thresholds.reference_chunks else None)
            self._recent = deque((_chunk_from(arrays, f"recent/{i}") for i in range(state["recent"])),
                                 maxlen=self.thresholds.smooth_chunks)
            self._last_frame = arrays.get("last_frame")
            self.chunks, self.signals = int(state["chunks"]), dict(state["signals"])
            self.crossings, self.drifted_chunks = dict(state["crossings"]), int(state["drifted_chunks"])
            self.reanchors, self._cooldown = int(state["reanchors"]), int(state["cooldown"])

    # ------------------------------------------------------------------ reading
    def status(self) -> dict:
        """JSON-safe figures: signals now, thresholds, crossings, re-anchors."""
        with self._lock:
            th = self.thresholds
            return {"policy": self.policy, "chunks": self.chunks, "reference_ready": self._ref is not None,
                    "signals": {s: (None if v is None else round(float(v), 6)) for s, v in self.signals.items()},
                    "thresholds": {s: (None if math.isinf(th.of(s)) else th.of(s)) for s in SIGNALS},
                    "over_threshold": {s: bool(v is not None and v > th.of(s)) for s, v in self.signals.items()},
                    "crossings": dict(self.crossings), "drifted_chunks": self.drifted_chunks,
                    "reanchors": self.reanchors, "settings": {k: v for k, v in asdict(th).items() if k not in SIGNALS}}


def _chunk_arrays(prefix: str, c: ChunkStats) -> dict[str, np.ndarray]:
    """One chunk's statistics as named arrays (a frame figure left out when the chunk had no frames)."""
    out = {f"{prefix}/latent_mean": c.latent_mean, f"{prefix}/latent_std": c.latent_std}
    if c.mean_rgb is not None:
        out[f"{prefix}/mean_rgb"] = c.mean_rgb
    if c.frame_change is not None:
        out[f"{prefix}/frame_change"] = np.array([c.frame_change], np.float64)  # [1]: a snapshot keeps no 0-d arrays
    return out


def _chunk_from(arrays: dict[str, np.ndarray], prefix: str) -> ChunkStats:
    change = arrays.get(f"{prefix}/frame_change")
    return ChunkStats(arrays[f"{prefix}/latent_mean"], arrays[f"{prefix}/latent_std"], arrays.get(f"{prefix}/mean_rgb"),
                      None if change is None else float(change[0]))


def _reference_figures(chunks: list[ChunkStats]) -> dict:
    """The reference: per-channel mean and (pooled) std of the first chunks; their mean colour and change."""
    mean = np.mean([c.latent_mean for c in chunks], axis=0)
    # Pooled per-channel variance around the reference mean: within-chunk spread plus between-chunk spread.
    var = np.mean([c.latent_std**2 + (c.latent_mean - mean) ** 2 for c in chunks], axis=0)
    spread = np.sqrt(np.mean([c.latent_std**2 for c in chunks], axis=0))  # within-chunk, as _signals measures it
    ref = {"latent_mean": mean, "latent_std": np.maximum(np.sqrt(var), STD_FLOOR),
           "latent_spread": np.maximum(spread, STD_FLOOR), "mean_rgb": None, "frame_change": None}
    rgb = [c.mean_rgb for c in chunks if c.mean_rgb is not None]
    change = [c.frame_change for c in chunks if c.frame_change is not None]
    if rgb:
        ref["mean_rgb"] = np.mean(rgb, axis=0)
    if change:
        ref["frame_change"] = float(np.mean(change))
    return ref


def _signals(ref: dict, recent: list[ChunkStats]) -> dict[str, float | None]:
    """The four signals of the recent chunks' rolling mean against the reference (None: not measurable)."""
    mean = np.mean([c.latent_mean for c in recent], axis=0)
    std = np.sqrt(np.mean([c.latent_std**2 for c in recent], axis=0))
    out: dict[str, float | None] = {
        "latent_mean_shift": float(np.max(np.abs(mean - ref["latent_mean"]) / ref["latent_std"])),
        "latent_std_ratio": float(np.max(np.abs(np.log(np.maximum(std, STD_FLOOR) / ref["latent_spread"])))),
        "frame_change_ratio": None, "colour_distance": None}
    change = [c.frame_change for c in recent if c.frame_change is not None]
    if change and ref["frame_change"] is not None:
        now, then = max(float(np.mean(change)), CHANGE_FLOOR), max(ref["frame_change"], CHANGE_FLOOR)
        out["frame_change_ratio"] = abs(math.log(now / then))
    rgb = [c.mean_rgb for c in recent if c.mean_rgb is not None]
    if rgb and ref["mean_rgb"] is not None:
        out["colour_distance"] = float(np.linalg.norm(np.mean(rgb, axis=0) - ref["mean_rgb"]))
    return out
