"""Server figures: one thread-safe owner, rendered as /status JSON and Prometheus text (/metrics)."""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Callable

# Per-chunk generation latency buckets (seconds): fine from 10 ms to 500 ms, where a small block on
# a CPU or a GPU lands, coarse above up to a real checkpoint's window of tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.125, 0.15, 0.175,
                   0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0
LATENCY_WINDOW = 1000  # /status percentiles come from the last this many measured chunk latencies


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.n += 1



class RollingWindow:
    """The last `size` measurements, for percentiles of what was measured (not bucket bounds)."""

    def __init__(self, size: int = LATENCY_WINDOW):
        self.values: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self.values.append(value)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100) with linear interpolation between the two nearest ranks
        (numpy's default method); None before any measurement."""
        if not self.values:
            return None
        ordered = sorted(self.values)
        rank = (len(ordered) - 1) * q / 100.0
        low = int(rank)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Metrics:
    """Counters the generator, pacer and HTTP handlers update; all access under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.frames_generated = 0  # frames the pipeline produced
        self.frames_output = 0  # frames the pacer emitted (generated + repeated)
        self.frames_repeated = 0  # pacer ticks with no new frame: the last one was shown again
        self.pacer_resyncs = 0  # the pacer fell > 1 s behind its clock and restarted it
        self.first_frame_s: float | None = None
        self.last_chunk_s: float | None = None  # uptime at which frames_generated last grew
        self.generator_errors = 0
        self.generator_restarts = 0
        self.generator_stalls = 0  # generators restarted by --generator-stall
        self.last_error: str | None = None
        self.encoder_errors = 0
        self.chunk_latency = Histogram(LATENCY_BUCKETS)
        self.chunk_latency_window = RollingWindow()
        self.clients_gone = 0  # requests or streams whose client went away first (normal for viewers)
        self.clients: dict[int, tuple[str, object]] = {}  # reader id -> (format, Reader)
        self.client_drops_total: dict[str, int] = {}
        self.clients_served: dict[str, int] = {}
        self.client_write_timeouts = 0
        self._queued: dict[int, Callable[[], int]] = {}  # reader id -> bytes queued unsent for it, now
        self.control_refused = 0  # control requests refused before their body was read (Host, Origin, token, type)
        self._generated_times: deque[tuple[float, int]] = deque()
        # The running stream's drift monitor (runtime/drift.py DriftMonitor.status); re-anchors and
        # crossings of streams that ended (a generator restart) are kept in the totals.
        self.drift: dict | None = None
        self._drift_done = {"reanchors": 0, "crossings": {}}
        # Outputs with figures of their own (push targets, HLS answers): callables returning Prometheus text,
        # appended to /metrics; each reads its own state under its own lock.
        self.sections: list = []

    # -- updates
    def chunk_generated(self, frames: int, seconds: float) -> None:
        now = time.monotonic()
        with self.lock:
            self.frames_generated += frames
            self.chunk_latency.observe(seconds)
            self.chunk_latency_window.add(seconds)
            if self.first_frame_s is None:
                self.first_frame_s = now - self.started
            self.last_chunk_s = now - self.started
            self._generated_times.append((now, frames))
            while self._generated_times and self._generated_times[0][0] < now - RATE_WINDOW_S:
                self._generated_times.popleft()

    def drift_observed(self, status: dict | None) -> None:
        """The stream's drift monitor after a chunk. A status whose chunk count went down is a new stream:
        the old one's counts move to the totals."""
        if status is None:
            return
        with self.lock:
            old = self.drift
            if old is not None and status["chunks"] < old["chunks"]:
                self._drift_done["reanchors"] += old["reanchors"]
                for name, n in old["crossings"].items():
                    self._drift_done["crossings"][name] = self._drift_done["crossings"].get(name, 0) + n
            self.drift = status

    def _drift_totals(self) -> tuple[int, dict[str, int]]:
        """(re-anchors, crossings per signal) over every stream this server ran (call with the lock held)."""
        done, now = self._drift_done, self.drift or {"reanchors": 0, "crossings": {}}
        crossings = dict(done["crossings"])
        for name, n in now["crossings"].items():
            crossings[name] = crossings.get(name, 0) + n
        return done["reanchors"] + now["reanchors"], crossings

    def frame_output(self, repeated: bool) -> None:
        with self.lock:
            self.frames_output += 1
            self.frames_repeated += int(repeated)

    def generator_failed(self, error: BaseException) -> None:
        with self.lock:
            self.generator_errors += 1
            self.last_error = f"{type(error).__name__}: {error}"[:500]

    def client_connected(self, fmt: str, reader, queued_bytes: Callable[[], int] | None = None) -> None:
        """A stream client starts; `queued_bytes` says how many bytes the server holds for it unsent
        (its transport's write buffer) when a figure is rendered."""
        with self.lock:
            self.clients[reader.id] = (fmt, reader)
            self.clients_served[fmt] = self.clients_served.get(fmt, 0) + 1
            if queued_bytes is not None:
                self._queued[reader.id] = queued_bytes

    def client_disconnected(self, fmt: str, reader) -> None:
        with self.lock:
            self.clients.pop(reader.id, None)
            self._queued.pop(reader.id, None)
            self.client_drops_total[fmt] = self.client_drops_total.get(fmt, 0) + reader.missed

    def _queued_bytes(self) -> dict[int, int]:
        """Bytes queued unsent per client id, for the clients that report it (lock held)."""
        queued = {}
        for rid, measure in self._queued.items():
            try:
                queued[rid] = int(measure())
            except Exception:  # a transport torn down between the client's end and its bookkeeping
                queued[rid] = 0
        return queued

    def _queued_max_per_format(self) -> dict[str, int]:
        """The most bytes queued unsent for one client, per format (lock held)."""
        most: dict[str, int] = {}
        for rid, n in self._queued_bytes().items():
            fmt = self.clients[rid][0] if rid in self.clients else "?"
            most[fmt] = max(most.get(fmt, 0), n)
        return most

    # -- reads
    def _clients_per_format(self) -> dict[str, int]:
        """Connected readers per output format (call with the lock held)."""
        counts: dict[str, int] = {}
        for fmt, _ in self.clients.values():
            counts[fmt] = counts.get(fmt, 0) + 1
        return counts

    def generated_fps(self) -> float:
        """Frames generated per second over the last RATE_WINDOW_S seconds."""
        with self.lock:
            times = list(self._generated_times)
        if len(times) < 2:
            return 0.0
        span = max(1e-6, times[-1][0] - times[0][0])
        return sum(n for _, n in times[1:]) / span

    def snapshot(self) -> dict:
        fps = self.generated_fps()
        with self.lock:
            clients = self._clients_per_format()
            drops = dict(self.client_drops_total)
            for fmt, reader in self.clients.values():
                drops[fmt] = drops.get(fmt, 0) + reader.missed
            return {
                "uptime_s": round(time.monotonic() - self.started, 4),
                "frames_generated": self.frames_generated,
                # the uptime at which frames_generated reached its value: a rate between two snapshots
                # taken at chunk boundaries is exact (frames arrive a chunk at a time)
                "last_chunk_at_s": None if self.last_chunk_s is None else round(self.last_chunk_s, 4),
                "frames_output": self.frames_output,
                "frames_repeated": self.frames_repeated,
                "generated_fps": round(fps, 3),
                "time_to_first_frame_s": self.first_frame_s,
                **self._latency_summary(),
                "generator_errors": self.generator_errors,
                "generator_restarts": self.generator_restarts,
                "generator_stalls": self.generator_stalls,
                "last_error": self.last_error,
                "encoder_errors": self.encoder_errors,
                "pacer_resyncs": self.pacer_resyncs,
                "clients": clients,
                "client_drops": drops,
                "client_queued_bytes_max": self._queued_max_per_format(),
                "client_write_timeouts": self.client_write_timeouts,
                "clients_gone": self.clients_gone,
                "control_refused": self.control_refused,
                "drift": self._drift_snapshot(),
            }

    def _drift_snapshot(self) -> dict | None:
        """/status "drift": the running stream's monitor, with re-anchors over the server's life (lock held)."""
        if self.drift is None:
            return None
        reanchors, crossings = self._drift_totals()
        return {**self.drift, "reanchors_total": reanchors, "crossings_total": crossings}

    def _drift_metrics(self, metric) -> None:
        """The drift families, once a stream reported its monitor (call with the lock held)."""
        if self.drift is not None:
            _drift_lines(metric, self.drift, *self._drift_totals())

    def _latency_summary(self) -> dict:
        """Chunk latency percentiles, min and max over the rolling window (call with the lock held)."""
        window = self.chunk_latency_window
        values = window.values

        def rounded(value):
            return None if value is None else round(value, 6)

        return {"chunk_latency_p50_s": rounded(window.percentile(50)),
                "chunk_latency_p99_s": rounded(window.percentile(99)),
                "chunk_latency_min_s": rounded(min(values)) if values else None,
                "chunk_latency_max_s": rounded(max(values)) if values else None,
                "chunk_latency_window": len(values)}

    def prometheus(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        fps = self.generated_fps()
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_num(value)}" for labels, value in samples)

        with self.lock:
            metric("skyrt_frames_generated_total", "counter", "Frames produced by the pipeline.",
                   [("", self.frames_generated)])
            metric("skyrt_frames_output_total", "counter", "Frames emitted at the output frame rate.",
                   [("", self.frames_output)])
            metric("skyrt_frames_repeated_total", "counter",
                   "Output ticks that repeated the last frame because generation was slower than the fps.",
                   [("", self.frames_repeated)])
            metric("skyrt_generated_fps", "gauge", f"Generated frames per second over the last {RATE_WINDOW_S:g} s.",
                   [("", fps)])
            metric("skyrt_time_to_first_frame_seconds", "gauge", "Server start to first generated frame.",
                   [("", self.first_frame_s if self.first_frame_s is not None else float("nan"))])
            h = self.chunk_latency
            buckets, seen = [], 0
            for count, bound in zip(h.counts, h.buckets + (float("inf"),)):
                seen += count
                buckets.append((f'{{le="{_num(bound)}"}}', seen))
            lines.append("# HELP skyrt_chunk_latency_seconds Time to generate one chunk (a latent block, or a window).")
            lines.append("# TYPE skyrt_chunk_latency_seconds histogram")
            lines.extend(f"skyrt_chunk_latency_seconds_bucket{labels} {value}" for labels, value in buckets)
            lines.append(f"skyrt_chunk_latency_seconds_sum {_num(h.total)}")
            lines.append(f"skyrt_chunk_latency_seconds_count {h.n}")
            window = self.chunk_latency_window
            metric("skyrt_chunk_latency_window_seconds", "gauge",
                   f"Chunk latency percentiles over the last {window.values.maxlen} measured chunks.",
                   [(f'{{quantile="{q / 100:g}"}}', nan_if_none(window.percentile(q))) for q in (50, 99)])
            metric("skyrt_generator_errors_total", "counter", "Generator failures (each followed by a clean restart).",
                   [("", self.generator_errors)])
            metric("skyrt_generator_stalls_total", "counter",
                   "Generators restarted after producing no frame for --generator-stall seconds.",
                   [("", self.generator_stalls)])
            metric("skyrt_encoder_errors_total", "counter", "Output encoder failures.", [("", self.encoder_errors)])
            metric("skyrt_pacer_resyncs_total", "counter", "Times the pacer fell over 1 s behind and reset its clock.",
                   [("", self.pacer_resyncs)])
            metric("skyrt_clients", "gauge", "Connected stream clients.",
                   [(f'{{format="{f}"}}', n) for f, n in sorted(self._clients_per_format().items())])
            metric("skyrt_client_queue_drops", "gauge", "Items a connected client missed because it read too slowly.",
                   [(f'{{client="{rid}",format="{fmt}"}}', r.missed) for rid, (fmt, r) in sorted(self.clients.items())])
            queued = self._queued_bytes()
            metric("skyrt_client_queued_bytes", "gauge",
                   "Bytes the server holds unsent for a connected stream client (its socket took no more).",
                   [(f'{{client="{rid}",format="{self.clients[rid][0]}"}}', n) for rid, n in sorted(queued.items())
                    if rid in self.clients])
            metric("skyrt_client_queue_drops_total", "counter", "Items dropped for clients that have disconnected.",
                   [(f'{{format="{f}"}}', n) for f, n in sorted(self.client_drops_total.items())])
            metric("skyrt_client_write_timeouts_total", "counter", "Clients cut off after a write stalled.",
                   [("", self.client_write_timeouts)])
            metric("skyrt_clients_gone_total", "counter", "Requests and streams whose client went away first.",
                   [("", self.clients_gone)])
            metric("skyrt_control_refused_total", "counter",
                   "Control requests refused for their Host, Origin, token or content type.", [("", self.control_refused)])
            self._drift_metrics(metric)
        rss, fds = process_resources()
        metric("skyrt_process_resident_memory_bytes", "gauge", "Resident memory of the server process.", [("", rss)])
        metric("skyrt_process_open_fds", "gauge", "Open file descriptors of the server process.", [("", fds)])
        return "\n".join(lines) + "\n" + "".join(section() for section in self.sections)


def _drift_lines(metric, drift: dict, reanchors: int, crossings: dict[str, int]) -> None:
    """The drift monitor's Prometheus families (runtime/drift.py): signals, thresholds, crossings, re-anchors."""
    signals = sorted(drift["signals"])
    metric("skyrt_drift_signal", "gauge", "Drift monitor signal of the running stream vs its first blocks.",
           [(f'{{signal="{s}"}}', nan_if_none(drift["signals"][s])) for s in signals])
    metric("skyrt_drift_threshold", "gauge", "Threshold above which a drift signal counts as a crossing.",
           [(f'{{signal="{s}"}}', float("inf") if drift["thresholds"][s] is None else drift["thresholds"][s])
            for s in signals])
    metric("skyrt_drift_crossings_total", "counter", "Chunks on which a drift signal was above its threshold.",
           [(f'{{signal="{s}"}}', crossings.get(s, 0)) for s in signals])
    metric("skyrt_drift_reanchors_total", "counter",
           "Re-anchors (the cache committed again under the prompt) the drift monitor triggered.", [("", reanchors)])


def process_resources(pid: int | str = "self") -> tuple[int, int]:
    """(resident bytes, open file descriptors) of a process (this one by default); -1 where the OS
    does not say."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        rss = -1
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = -1
    return rss, fds


def nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def _num(value: float) -> str:
    if value != value:
        return "NaN"
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)
