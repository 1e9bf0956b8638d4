"""The process that owns one logical GPU of a fleet with admission by memory (config `gpus`): it holds
the weights, runs the streams booked on that GPU, and hands their chunks to the stream actors.

    GpuWorker       named `<fleet>/gpu/<name>`, detached, restarted by Ray; takes one whole Ray GPU
                    when its streams run on CUDA (Ray sets its CUDA_VISIBLE_DEVICES), so every stream
                    booked on the logical GPU runs on that one device: the booking is the placement.
                    Streams of one model share one loaded copy (shared_models.ModelCache) and take
                    turns chunk by chunk on it (one lock per model).
    RemotePipeline  the stream actor's side: a Pipeline-like object for StreamServer / GeneratorThread
                    (`resolve`, `stream`, `stop`), whose streams run in the worker. The stream actor
                    keeps its HTTP server, pacer and encoders; only generation moves.

The worker sets its intra-op thread count to the CPUs Ray gave it, at least one (runtime/threads.py),
before any model loads, and reports it (`info`, and each stream's /status generator_process.threads).
A stream whose spec names a snapshot path (the fleet's snapshot folder, stream_host.py) is snapshotted
here, where its state lives, as a `skyrt serve --state` child does (runtime/server/resume.py): every
`snapshot_every_s`, when its actor stops (`snapshot_now`), and resumed at its next `open`; a snapshot that
does not fit is refused (logged, counted in `snapshot_figures`) and the stream starts fresh.

A worker that dies is restarted by Ray and loads models again as streams reopen theirs (each call
that opens a stream names its model); a stream whose worker died sees an error on its next chunk and
its generator restarts it, holding the last frame meanwhile.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import ray

from .shared_models import ModelCache, ModelKey

log = logging.getLogger("skyrt.fleet")


def gpu_worker_name(fleet: str, gpu: str) -> str:
    return f"{fleet}/gpu/{gpu}"


@dataclass
class _Run:
    """One open run of a stream in the worker."""

    key: ModelKey
    pipe: object  # the shared Pipeline it runs on
    stream: object  # the FrameStream
    request: object  # its GenerationRequest (what a fresh start after a refused snapshot reopens)
    inputs: dict
    resuming_from: int | None = None  # the block of the snapshot it resumes, until its first chunk


@dataclass
class _SnapshotFigures:
    """A stream's snapshot outcomes in this worker (what /status reports as generator_process.snapshots)."""

    path: str
    every_s: float
    resumes: int = 0
    resumed_from_block: int | None = None
    refusals: int = 0
    last_refusal: str | None = None
    snapshots: object = field(default=None, repr=False)  # its resume.StreamSnapshots

    def to_json(self) -> dict:
        return {"path": self.path, "every_s": self.every_s, "resumes": self.resumes,
                "resumed_from_block": self.resumed_from_block, "refusals": self.refusals,
                "last_refusal": self.last_refusal}

    def take_refusal(self) -> None:
        if self.snapshots.last_refusal is not None:
            self.refusals += 1
            self.last_refusal, self.snapshots.last_refusal = self.snapshots.last_refusal, None


class WorkerStreams:
    """The stream runs of one GPU worker, on the models of its ModelCache (no Ray here): open a run
    (from the stream's snapshot when it has one that fits), its chunks (the streams of one model take
    turns, one chunk each), prompt changes, snapshots (resume.py's StreamSnapshots per stream) and close."""

    def __init__(self, models: ModelCache, name: str):
        self.models, self.name = models, name
        self._streams: dict[tuple[str, int], _Run] = {}  # (stream id, n) -> its open run
        self._snapshots: dict[str, _SnapshotFigures] = {}  # stream id -> its snapshots, while attached
        self._lock = threading.Lock()

    def _snapshots_of(self, stream_id: str, spec) -> _SnapshotFigures | None:
        """The stream's snapshots (made at its first open; None when its spec names no snapshot path)."""
        if getattr(spec, "snapshot_path", None) is None:
            return None
        with self._lock:
            figures = self._snapshots.get(stream_id)
            if figures is None:
                from ..server.resume import StreamSnapshots

                figures = self._snapshots[stream_id] = _SnapshotFigures(
                    spec.snapshot_path, spec.snapshot_every_s,
                    snapshots=StreamSnapshots(spec.snapshot_path, spec.snapshot_every_s, spec.model))
            return figures

    def open(self, stream_id: str, n: int, key: ModelKey, spec, request, inputs: dict) -> None:
        """Start stream `stream_id`'s n-th run of `request` (a worker restarted since reloads the model),
        from the stream's snapshot when it has one that fits."""
        pipe = self.models.acquire(key, stream_id, spec.load)
        self.close(stream_id, None)
        figures = self._snapshots_of(stream_id, spec)
        snapshot = None
        if figures is not None:
            snapshot = figures.snapshots.load(request)
            figures.take_refusal()
        with self.models.lock_of(key):
            stream = pipe.stream(request=request, resume=snapshot, **inputs)
        resuming_from = None if snapshot is None else int(snapshot.state.get("blocks", 0))
        run = _Run(key, pipe, stream, request, inputs, resuming_from)
        with self._lock:
            self._streams[(stream_id, n)] = run

    def next_chunk(self, stream_id: str, n: int) -> tuple | None:
        """(uint8 chunk [n, H, W, 3], seconds, prompt, drift status), or None when the stream ended."""
        with self._lock:
            run = self._streams.get((stream_id, n))
            figures = self._snapshots.get(stream_id)
        if run is None:
            raise RuntimeError(f"stream {stream_id!r} run {n} is not open in gpu worker {self.name!r} (it restarted?)")
        started = time.monotonic()
        with self.models.lock_of(run.key):  # the streams of one model take turns, one chunk each
            try:
                chunk = next(run.stream)
            except StopIteration:
                return None
            except Exception as err:
                if run.resuming_from is None:
                    raise
                # The snapshot passed its checks but does not fit the stream: refused, a fresh start.
                figures.snapshots.refuse(err)
                figures.take_refusal()
                self._close_stream(run.stream)
                run.stream, run.resuming_from = self._fresh(run), None
                chunk = next(run.stream)
            if run.resuming_from is not None:  # its first chunk came: resumed
                figures.resumes += 1
                figures.resumed_from_block, run.resuming_from = run.resuming_from, None
            if figures is not None:
                figures.snapshots.write_if_due(run.stream, run.request)
        drift = getattr(run.stream, "drift_status", None)
        return (np.ascontiguousarray(chunk, dtype=np.uint8), time.monotonic() - started, run.stream.prompt,
                None if drift is None else drift())

    def _fresh(self, run: _Run):
        """A new stream of the run's request (its model's lock held by the caller)."""
        return run.pipe.stream(request=run.request, **run.inputs)

    def snapshot_now(self, stream_id: str) -> bool:
        """Write the stream's snapshot now, between two of its chunks (its actor is stopping)."""
        with self._lock:
            figures = self._snapshots.get(stream_id)
            runs = [run for (sid, _), run in sorted(self._streams.items()) if sid == stream_id]
        if figures is None or not runs:
            return False
        run = runs[-1]
        with self.models.lock_of(run.key):
            return figures.snapshots.write(run.stream, run.request)

    def snapshot_figures(self, stream_id: str) -> dict | None:
        """The stream's snapshot path and outcomes (None without snapshots)."""
        with self._lock:
            figures = self._snapshots.get(stream_id)
        return None if figures is None else figures.to_json()

    def set_prompt(self, stream_id: str, n: int, prompt: str, negative_prompt, recache: bool) -> None:
        with self._lock:
            entry = self._streams.get((stream_id, n))
        if entry is not None:
            entry.stream.set_prompt(prompt, negative_prompt, recache=recache)

    def close(self, stream_id: str, n: int | None) -> None:
        """End the stream's run n (every run with n None)."""
        with self._lock:
            ends = [k for k in self._streams if k[0] == stream_id and (n is None or k[1] == n)]
            closing = [self._streams.pop(k).stream for k in ends]
        for stream in closing:
            self._close_stream(stream)

    @staticmethod
    def _close_stream(stream) -> None:
        try:
            stream.close()
        except Exception:
            pass

    def forget(self, stream_id: str) -> None:
        """The stream left the worker: its runs end, its snapshot bookkeeping goes (its file stays)."""
        self.close(stream_id, None)
        with self._lock:
            self._snapshots.pop(stream_id, None)


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=32)
class GpuWorker:
    """One logical GPU's process (see the module docstring). Calls come from the stream actors' threads."""

    def __init__(self, fleet: str, gpu: str):
        from ..threads import apply_thread_count, owned_thread_count, threads_in_use

        self.fleet, self.gpu = fleet, gpu
        # Before any model loads (torch reads OMP_NUM_THREADS at import): the CPUs this actor owns.
        apply_thread_count(owned_thread_count(ray.get_runtime_context().get_assigned_resources().get("CPU")))
        self.models = ModelCache()
        self.streams = WorkerStreams(self.models, gpu)
        node_id = ray.get_runtime_context().get_node_id()
        self.placement = {"node_id": node_id, "gpus": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid(),
                          "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        self._threads_in_use = threads_in_use

    @property
    def threads(self) -> dict:
        return self._threads_in_use()

    def attach(self, stream_id: str, key: ModelKey, spec) -> dict:
        """Load (or share) the stream's model; returns its layers (requests resolve against them in the
        stream actor) and where it runs."""
        pipe = self.models.acquire(key, stream_id, spec.load)
        log.info("fleet %s gpu %s: stream %s on %s (%d model load(s) in this process)", self.fleet, self.gpu,
                 stream_id, key.label(), self.models.loads)
        return {"layers": pipe.layers, "placement": self.placement, "model_object_id": id(pipe),
                "threads": self.threads}

    def detach(self, stream_id: str) -> list[str]:
        """The stream left: its runs end and its model is freed if no other stream uses it."""
        self.streams.forget(stream_id)
        freed = self.models.release(stream_id)
        for key in freed:
            log.info("fleet %s gpu %s: %s freed (no stream uses it)", self.fleet, self.gpu, key.label())
        return [key.label() for key in freed]

    # The streams' runs (WorkerStreams): called from the stream actors' RemotePipeline / RemoteStream.
    def open(self, stream_id: str, n: int, key: ModelKey, spec, request, inputs: dict) -> None:
        self.streams.open(stream_id, n, key, spec, request, inputs)

    def next_chunk(self, stream_id: str, n: int) -> tuple | None:
        return self.streams.next_chunk(stream_id, n)

    def set_prompt(self, stream_id: str, n: int, prompt: str, negative_prompt, recache: bool) -> None:
        self.streams.set_prompt(stream_id, n, prompt, negative_prompt, recache)

    def close(self, stream_id: str, n: int | None) -> None:
        self.streams.close(stream_id, n)

    def snapshot_now(self, stream_id: str) -> bool:
        return self.streams.snapshot_now(stream_id)

    def snapshot_figures(self, stream_id: str) -> dict | None:
        return self.streams.snapshot_figures(stream_id)

    def info(self) -> dict:
        """Where this worker runs and which models it holds for which streams."""
        return {"gpu": self.gpu, "placement": self.placement, "models": self.models.describe(),
                "loads": self.models.loads, "threads": self.threads}


class RemotePipeline:
    """A stream actor's handle on its GPU worker: `start` attaches (loads or shares the model), `resolve`
    resolves here against the model's layers, `stream` runs in the worker. `stop` detaches."""

    def __init__(self, worker, stream_id: str, key: ModelKey, spec):
        self.worker, self.stream_id, self.key, self.spec = worker, stream_id, key, spec
        self.layers = None
        self.placement: dict | None = None
        self.model_object_id: int | None = None
        self.threads: dict | None = None  # the worker's intra-op threads, as it reported them at attach
        self._runs = itertools.count(1)
        self._stopped = False

    def start(self, cancelled: threading.Event | None = None) -> dict:
        ref = self.worker.attach.remote(self.stream_id, self.key, self.spec)
        while True:
            ready, _ = ray.wait([ref], timeout=0.2)
            if ready:
                break
            if cancelled is not None and cancelled.is_set():
                try:
                    ray.cancel(ref)
                except Exception:  # a threaded actor's task may not be cancellable: it finishes unread
                    pass
                from ..server.startup import StartupInterrupted

                raise StartupInterrupted("stopped before the model loaded")
        info = ray.get(ref)
        self.layers, self.placement, self.model_object_id = info["layers"], info["placement"], info["model_object_id"]
        self.threads = info.get("threads")
        return info

    def resolve(self, settings=None, stream: bool = False):
        from ..resolve import resolve_request

        if self.layers is None:
            raise RuntimeError("start() the remote pipeline first: a request resolves against its model")
        return resolve_request(settings, self.layers, stream=stream)

    def stream(self, request, **inputs) -> "RemoteStream":
        n = next(self._runs)
        ray.get(self.worker.open.remote(self.stream_id, n, self.key, self.spec, request, inputs))
        return RemoteStream(self, n, request.prompt)

    def snapshot_now(self, timeout: float = 10.0) -> bool:
        """Have the worker write this stream's snapshot now (StreamServer.stop); False if it cannot."""
        if self.spec.snapshot_path is None:
            return False
        try:
            return bool(ray.get(self.worker.snapshot_now.remote(self.stream_id), timeout=timeout))
        except Exception as err:  # the worker gone or busy past the timeout: the last periodic snapshot stands
            log.warning("stream %s: no snapshot at the stop (%s)", self.stream_id, type(err).__name__)
            return False

    def snapshot_figures(self) -> dict | None:
        """The stream's snapshot outcomes in its worker (None without snapshots or when it does not answer)."""
        if self.spec.snapshot_path is None:
            return None
        try:
            return ray.get(self.worker.snapshot_figures.remote(self.stream_id), timeout=2.0)
        except Exception:
            return None

    def generator_status(self) -> dict:
        """/status's generator_process for a stream generating in its GPU worker."""
        return {"pid": None if self.placement is None else self.placement["pid"], "gpu_worker": True,
                "threads": self.threads, "snapshots": self.snapshot_figures()}

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            ray.get(self.worker.detach.remote(self.stream_id), timeout=10)
        except Exception as err:  # the worker is gone: it holds nothing of this stream any more
            log.info("stream %s: detaching from its gpu worker: %s", self.stream_id, type(err).__name__)


class RemoteStream:
    """One run of a stream in the worker: iterate for uint8 chunks [n, H, W, 3]."""

    def __init__(self, owner: RemotePipeline, n: int, prompt: str):
        self.owner, self.n, self.prompt = owner, n, prompt
        self.last_chunk_seconds: float | None = None
        self._drift: dict | None = None
        self._closed = False

    def __iter__(self) -> "RemoteStream":
        return self

    def __next__(self) -> np.ndarray:
        if self._closed:
            raise StopIteration
        got = ray.get(self.owner.worker.next_chunk.remote(self.owner.stream_id, self.n))
        if got is None:
            self._closed = True
            raise StopIteration
        chunk, self.last_chunk_seconds, self.prompt, self._drift = got
        return chunk

    def drift_status(self) -> dict | None:
        return self._drift

    def set_prompt(self, prompt: str, negative_prompt: str | None = None, recache: bool = False) -> None:
        self.owner.worker.set_prompt.remote(self.owner.stream_id, self.n, prompt, negative_prompt, bool(recache))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.owner.worker.close.remote(self.owner.stream_id, self.n)
