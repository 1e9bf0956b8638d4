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

import numpy as np
import ray

from .shared_models import ModelCache, ModelKey

log = logging.getLogger("skyrt.fleet")


def gpu_worker_name(fleet: str, gpu: str) -> str:
    return f"{fleet}/gpu/{gpu}"


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=32)
class GpuWorker:
    """One logical GPU's process (see the module docstring). Calls come from the stream actors' threads."""

    def __init__(self, fleet: str, gpu: str):
        self.fleet, self.gpu = fleet, gpu
        self.models = ModelCache()
        self._streams: dict[tuple[str, int], tuple[ModelKey, object]] = {}  # (stream id, n) -> (key, FrameStream)
        self._lock = threading.Lock()
        node_id = ray.get_runtime_context().get_node_id()
        self.placement = {"node_id": node_id, "gpus": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid(),
                          "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def attach(self, stream_id: str, key: ModelKey, spec) -> dict:
        """Load (or share) the stream's model; returns its layers (requests resolve against them in the
        stream actor) and where it runs."""
        pipe = self.models.acquire(key, stream_id, spec.load)
        log.info("fleet %s gpu %s: stream %s on %s (%d model load(s) in this process)", self.fleet, self.gpu,
                 stream_id, key.label(), self.models.loads)
        return {"layers": pipe.layers, "placement": self.placement, "model_object_id": id(pipe)}

    def open(self, stream_id: str, n: int, key: ModelKey, spec, request, inputs: dict) -> None:
        """Start stream `stream_id`'s n-th run of `request` (a worker restarted since reloads the model)."""
        pipe = self.models.acquire(key, stream_id, spec.load)
        self.close(stream_id, None)
        with self.models.lock_of(key):
            stream = pipe.stream(request=request, **inputs)
        with self._lock:
            self._streams[(stream_id, n)] = (key, stream)

    def next_chunk(self, stream_id: str, n: int) -> tuple | None:
        """(uint8 chunk [n, H, W, 3], seconds, prompt, drift status), or None when the stream ended."""
        with self._lock:
            entry = self._streams.get((stream_id, n))
        if entry is None:
            raise RuntimeError(f"stream {stream_id!r} run {n} is not open in gpu worker {self.gpu!r} (it restarted?)")
        key, stream = entry
        started = time.monotonic()
        with self.models.lock_of(key):  # the streams of one model take turns, one chunk each
            try:
                chunk = next(stream)
            except StopIteration:
                return None
        drift = getattr(stream, "drift_status", None)
        return (np.ascontiguousarray(chunk, dtype=np.uint8), time.monotonic() - started, stream.prompt,
                None if drift is None else drift())

    def set_prompt(self, stream_id: str, n: int, prompt: str, negative_prompt, recache: bool) -> None:
        with self._lock:
            entry = self._streams.get((stream_id, n))
        if entry is not None:
            entry[1].set_prompt(prompt, negative_prompt, recache=recache)

    def close(self, stream_id: str, n: int | None) -> None:
        """End the stream's run n (every run with n None)."""
        with self._lock:
            ends = [k for k in self._streams if k[0] == stream_id and (n is None or k[1] == n)]
            closing = [self._streams.pop(k)[1] for k in ends]
        for stream in closing:
            try:
                stream.close()
            except Exception:
                pass

    def detach(self, stream_id: str) -> list[str]:
        """The stream left: its runs end and its model is freed if no other stream uses it."""
        self.close(stream_id, None)
        freed = self.models.release(stream_id)
        for key in freed:
            log.info("fleet %s gpu %s: %s freed (no stream uses it)", self.fleet, self.gpu, key.label())
        return [key.label() for key in freed]

    def info(self) -> dict:
        """Where this worker runs and which models it holds for which streams."""
        return {"gpu": self.gpu, "placement": self.placement, "models": self.models.describe(),
                "loads": self.models.loads}


class RemotePipeline:
    """A stream actor's handle on its GPU worker: `start` attaches (loads or shares the model), `resolve`
    resolves here against the model's layers, `stream` runs in the worker. `stop` detaches."""

    def __init__(self, worker, stream_id: str, key: ModelKey, spec):
        self.worker, self.stream_id, self.key, self.spec = worker, stream_id, key, spec
        self.layers = None
        self.placement: dict | None = None
        self.model_object_id: int | None = None
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
