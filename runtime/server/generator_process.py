"""The pipeline in a process of its own, so that generation never shares a GIL with serving.

In one process the generator, the pacer (JPEG and H.264 encoding) and the HTTP event loop take turns
on one interpreter lock. On a CPU a DiT step is hundreds of small torch calls, each taking the lock
back, so every request a viewer makes and every frame the pacer encodes stalls the generator: 200 HLS
viewers cost the generator ~30% of its frames (benchmarks/serve.py). A child process owns the
pipeline (and the GPU, if any); the server process keeps the pacer and HTTP and receives uint8 frame
chunks over a pipe. Side benefits: a crash in native code (a segfault, the OOM killer) takes down
the child, not the server, which restarts it; and the serving process never imports torch.

`ProcessPipeline(spec)` is a drop-in for a Pipeline in `GeneratorThread`: `.resolve(settings, stream=True)`
resolves a request here, in the parent, against the layers the child's model reported when it loaded
(its recommendation, preset, checkpoint block size: runtime/resolve.py), and `.stream(request=...)`
runs that request in the child as it is (the child never re-applies defaults); the stream is an
iterator of chunks with `set_prompt`, `prompt` and `close`, like `Pipeline.stream`'s.

Protocol on one duplex pipe (child -> parent, after ("loaded", info) or ("load_failed", error); info
holds the model's ModelLayers under "layers"):
    ("chunk", stream_id, shape, seconds, prompt, drift) then the chunk's bytes   one uint8 chunk [n, H, W, 3];
                                                   drift: the stream's drift monitor status (runtime/drift.py)
    ("error", stream_id, text)                                           the stream raised; it is closed
    ("done", stream_id)                                                  a finite stream ended
parent -> child:
    ("start", stream_id, request, inputs)   close any stream, open `pipe.stream(request=request, **inputs)`
    ("prompt", stream_id, prompt, negative_prompt, recache)
    ("end", stream_id)               close that stream and wait
    ("snapshot", stream_id)          write the stream snapshot now (resume.py), then set the shared event
    ("server_state", stream_id, d)   what the server adds to the next snapshots (JSON)
With a snapshot path (--state), the child resumes a stream from its snapshot and writes one every
`snapshot_every_s` (runtime/server/resume.py); ("resumed", stream_id, server_state, block) tells the parent
before the first chunk of a resumed stream, ("snapshot_refused", stream_id, reason) that a snapshot was
refused and the stream starts fresh (the parent counts both: `ProcessPipeline.snapshot_figures`).
Messages of a stream the parent has closed are skipped by their id. The parent ends the child with
SIGKILL at a stop (it holds no state worth saving); on Linux the child also dies with its parent (PDEATHSIG).
"""
from __future__ import annotations

import builtins
import ctypes
import itertools
import logging
import multiprocessing
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from .startup import StartupInterrupted

log = logging.getLogger("skyrt.server")


@dataclass(frozen=True)
class PipelineSpec:
    """How to load a pipeline: `skyrt.load(model, backend=..., device=..., **options)` (picklable).
    threads: the intra-op thread count (runtime/threads.py) the child sets before the model loads;
    None leaves the libraries' defaults."""

    model: str | None = None
    backend: str = "torch"
    device: str = "cpu"
    options: dict = field(default_factory=dict)
    snapshot_path: str | None = None  # the stream snapshot (resume.py); None: no snapshots
    snapshot_every_s: float = 30.0
    threads: int | None = None

    def load(self):
        from ..api import load

        return load(self.model, backend=self.backend, device=self.device, **self.options)


class GeneratorProcessError(RuntimeError):
    """The child's stream failed (its text and traceback are in the message), or the child died."""


# ------------------------------------------------------------------------------------------ child
def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies, however the parent died."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _set_threads(spec: PipelineSpec) -> None:
    """The spec's intra-op thread count, set before torch / onnxruntime load (runtime/threads.py)."""
    from ..threads import ThreadCount, apply_thread_count

    apply_thread_count(ThreadCount(spec.threads, "spec"))


def _child_main(conn, spec: PipelineSpec, log_level: int, snapshot_done=None) -> None:
    """The child process: load the pipeline, then run the streams the parent asks for."""
    # The parent owns shutdown: Ctrl-C or a SIGTERM sent to the whole group must not kill this
    # process behind the server's back (it would count as a crash and restart).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    _set_threads(spec)
    from ..threads import threads_in_use

    try:
        pipe = spec.load()
    except BaseException as err:  # reported to the parent, which raises it where the server starts
        conn.send(("load_failed", type(err).__name__, str(err), traceback.format_exc()))
        return
    conn.send(("loaded", {"model": spec.model, "backend": spec.backend, "device": spec.device, "layers": pipe.layers,
                          "threads": threads_in_use()}))
    try:
        _ChildLoop(conn, pipe, _snapshots(spec), snapshot_done).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent went away


def _snapshots(spec: PipelineSpec):
    if spec.snapshot_path is None:
        return None
    from .resume import StreamSnapshots

    return StreamSnapshots(spec.snapshot_path, spec.snapshot_every_s, spec.model)


class _ChildLoop:
    def __init__(self, conn, pipe, snapshots=None, snapshot_done=None):
        self.conn, self.pipe = conn, pipe
        self.stream, self.stream_id = None, None
        self.snapshots, self.snapshot_done = snapshots, snapshot_done
        self.request, self.inputs, self.resuming = None, {}, False
        self.resumed_block = None  # the block of the snapshot being resumed

    def run(self) -> None:
        while True:
            # Control first: block when idle, else take whatever is pending between chunks.
            while self.stream is None or self.conn.poll(0):
                self._handle(self.conn.recv())
            self._send_next_chunk()

    def _handle(self, message) -> None:
        kind, stream_id = message[0], message[1]
        if kind == "start":
            self._close()
            self.stream_id = stream_id
            self.request, self.inputs = message[2], message[3]
            snapshot = None if self.snapshots is None else self.snapshots.load(self.request)
            self.resuming = snapshot is not None
            self.resumed_block = None if snapshot is None else snapshot.state.get("blocks")
            self._tell_refusal()
            try:
                self.stream = self.pipe.stream(request=self.request, resume=snapshot, **self.inputs)
            except Exception as err:
                self._report(err)
        elif kind == "prompt" and stream_id == self.stream_id and self.stream is not None:
            self.stream.set_prompt(message[2], message[3], recache=message[4])
        elif kind == "end" and stream_id == self.stream_id:
            self._close()
        elif kind == "server_state" and self.snapshots is not None:
            self.snapshots.server_state = dict(message[2])
        elif kind == "snapshot":
            written = (self.snapshots is not None and self.stream is not None and stream_id == self.stream_id
                       and self.snapshots.write(self.stream, self.request))
            if self.snapshot_done is not None:
                self.snapshot_done[1].value = int(written)
                self.snapshot_done[0].set()

    def _send_next_chunk(self) -> None:
        started = time.monotonic()
        try:
            chunk = next(self.stream)
        except StopIteration:
            self.conn.send(("done", self.stream_id))
            self._close()
            return
        except Exception as err:
            if self.resuming:  # the snapshot passed its checks but does not fit the stream: start fresh
                self.snapshots.refuse(err)
                self._tell_refusal()
                self._close()
                self.resuming = False
                self._handle(("start", self.stream_id, self.request, self.inputs))
                return
            self._report(err)
            return
        if self.resuming:
            self.resuming = False
            self.conn.send(("resumed", self.stream_id, self.snapshots.server_state, self.resumed_block))
        chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
        drift = getattr(self.stream, "drift_status", None)
        self.conn.send(("chunk", self.stream_id, chunk.shape, time.monotonic() - started, self.stream.prompt,
                        None if drift is None else drift()))
        self.conn.send_bytes(chunk.reshape(-1))  # 1-D: Connection slices a view by its first axis
        if self.snapshots is not None:
            self.snapshots.write_if_due(self.stream, self.request)

    def _tell_refusal(self) -> None:
        """A snapshot refused since the last call: the parent counts it (status, metrics)."""
        if self.snapshots is not None and self.snapshots.last_refusal is not None:
            self.conn.send(("snapshot_refused", self.stream_id, self.snapshots.last_refusal))
            self.snapshots.last_refusal = None

    def _report(self, err: Exception) -> None:
        self.conn.send(("error", self.stream_id, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        self._close()

    def _close(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()
            except Exception:
                pass
        self.stream = None


# ----------------------------------------------------------------------------------------- parent
class ProcessPipeline:
    """The parent's handle on the child: a Pipeline-like object whose streams run in the child.
    `stream` runs on the generator thread; `stop` may come from any thread."""

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self._context = multiprocessing.get_context("spawn")  # fork + torch threads is unsafe
        self._lock = threading.Lock()  # guards _process, _conn and _stopped
        self._process = None
        self._conn = None
        self._stopped = False
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self.starts = 0  # child processes started (1 + restarts after a death)
        self.layers = None  # the loaded model's ModelLayers (runtime/resolve.py), once started
        self._snapshot_done = (self._context.Event(), self._context.Value("b", 0))  # (answered, written)
        self._stream_id = None  # the stream running in the child now
        self.threads = None  # the child's intra-op threads as it reported them at load
        # Snapshot outcomes the child reported (resume.py): streams resumed, snapshots refused.
        self.snapshot_resumes, self.snapshot_refusals = 0, 0
        self.resumed_from_block: int | None = None
        self.last_snapshot_refusal: str | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None else process.pid

    def start(self, cancelled: threading.Event | None = None) -> dict:
        """Start the child and wait until it has loaded the pipeline. A load error is raised here,
        as the same exception type when it is a builtin one (ValueError, FileNotFoundError, ...);
        `cancelled` set while waiting (SIGTERM at start-up) ends the child and raises StartupInterrupted."""
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(target=_child_main, name="skyrt-generator",
                                        args=(child_conn, self.spec, logging.getLogger().getEffectiveLevel(),
                                              self._snapshot_done),
                                        daemon=True)
        with self._lock:
            if self._stopped:
                raise GeneratorProcessError("the server is stopping")
            process.start()
            self._process, self._conn = process, parent_conn
        child_conn.close()
        self.starts += 1
        while not parent_conn.poll(0.05):
            if cancelled is not None and cancelled.is_set():
                self.stop()
                raise StartupInterrupted("SIGTERM before the stream started")
            if not process.is_alive():
                break
        try:
            message = parent_conn.recv()
        except (EOFError, OSError):
            process.join(timeout=5)
            raise GeneratorProcessError(f"the generator process died while loading the model "
                                        f"(exit code {process.exitcode})") from None
        if message[0] == "load_failed":
            _, name, text, trace = message
            log.debug("generator process failed to load the model:\n%s", trace)
            self.stop()
            error = getattr(builtins, name, None)
            raise (error if isinstance(error, type) and issubclass(error, Exception) else RuntimeError)(text)
        log.info("generator process %d loaded the model", process.pid)
        self.layers = message[1]["layers"]
        self.threads = message[1].get("threads")
        return message[1]

    def resolve(self, settings=None, stream: bool = False):
        """The request `settings` resolve to on the child's model (like `Pipeline.resolve`), resolved here."""
        from ..resolve import resolve_request

        if self.layers is None:
            raise GeneratorProcessError("start() the generator process first: a request resolves against its model")
        return resolve_request(settings, self.layers, stream=stream)

    def stream(self, request, **inputs) -> "ChildStream":
        """Run the resolved stream `request` (`resolve(..., stream=True).request`) in the child; inputs: image."""
        process = self._process
        if process is None or not process.is_alive():
            if process is not None:
                log.warning("generator process %d died (exit code %s); starting a new one", process.pid,
                            process.exitcode)
                self._reap()
            self.start()
        stream_id = self._stream_id = next(self._ids)
        self.send(("start", stream_id, request, inputs))
        return ChildStream(self, stream_id, request.prompt)

    def send(self, message) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError, AttributeError):  # the child is gone: the reader notices
                pass

    def receive(self):
        """The next message from the child (with its payload for a chunk); raises
        GeneratorProcessError when the child has died (or was stopped)."""
        conn, process = self._conn, self._process
        try:
            message = conn.recv()
            return message, conn.recv_bytes() if message[0] == "chunk" else None
        except (EOFError, OSError, AttributeError) as err:
            code = None
            if process is not None:
                process.join(timeout=1.0)
                code = process.exitcode
            raise GeneratorProcessError(f"the generator process died (exit code {code})") from err

    def snapshot_now(self, timeout: float = 10.0) -> bool:
        """Ask the child to write its stream snapshot now (it does between chunks) and wait for it;
        False when there is none to write or it did not finish within `timeout` seconds."""
        if self.spec.snapshot_path is None or self._stream_id is None or self._process is None:
            return False
        answered, written = self._snapshot_done
        answered.clear()
        self.send(("snapshot", self._stream_id))
        return answered.wait(timeout) and bool(written.value)

    def snapshot_figures(self) -> dict | None:
        """The stream snapshot's path and outcomes (None without snapshots): for /status and /metrics."""
        if self.spec.snapshot_path is None:
            return None
        return {"path": self.spec.snapshot_path, "every_s": self.spec.snapshot_every_s,
                "resumes": self.snapshot_resumes, "resumed_from_block": self.resumed_from_block,
                "refusals": self.snapshot_refusals, "last_refusal": self.last_snapshot_refusal}

    def note_snapshot(self, kind: str, detail) -> None:
        """Count a snapshot outcome the child reported (the generator thread, reading its stream)."""
        if kind == "resumed":
            self.snapshot_resumes += 1
            self.resumed_from_block = detail
        else:
            self.snapshot_refusals += 1
            self.last_snapshot_refusal = detail

    def stop(self) -> None:
        """Kill the child (any thread; for good): it holds nothing worth saving, and a blocked
        `receive` on the generator thread returns at once."""
        with self._lock:
            self._stopped = True
        self._reap()

    def kill_child(self) -> None:
        """Kill the child now (a stalled generator, StallWatchdog): the blocked `receive` raises and the
        generator thread starts a new child, as after a crash."""
        self._reap()

    def _reap(self) -> None:
        with self._lock:
            process, conn = self._process, self._conn
            self._process = self._conn = None
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
        if conn is not None:
            conn.close()


class ChildStream:
    """One stream running in the child: iterate for uint8 chunks [n, H, W, 3] (read-only arrays)."""

    def __init__(self, owner: ProcessPipeline, stream_id: int, prompt: str):
        self.owner, self.stream_id = owner, stream_id
        self.prompt = prompt  # what the child reports it is denoising with now
        self.last_chunk_seconds: float | None = None  # the child's own time for the last chunk
        self.resumed_server_state: dict | None = None  # set when the child resumed this stream from a snapshot
        self._drift: dict | None = None  # the child's drift monitor status after the last chunk
        self._closed = False

    def __iter__(self) -> "ChildStream":
        return self

    def __next__(self) -> np.ndarray:
        while not self._closed:
            message, payload = self.owner.receive()
            if message[1] != self.stream_id:
                continue  # left over from a stream closed earlier
            kind = message[0]
            if kind == "resumed":  # a resumed stream: what the server saved with the snapshot
                self.resumed_server_state = message[2]
                self.owner.note_snapshot("resumed", message[3])
                continue
            if kind == "snapshot_refused":  # the stream starts fresh; counted
                self.owner.note_snapshot("refused", message[2])
                continue
            if kind == "chunk":
                _, _, shape, seconds, prompt, self._drift = message
                self.last_chunk_seconds, self.prompt = seconds, prompt
                return np.frombuffer(payload, dtype=np.uint8).reshape(shape)
            self._closed = True
            if kind == "error":
                raise GeneratorProcessError(message[2])
        raise StopIteration

    def drift_status(self) -> dict | None:
        """The stream's drift monitor figures, as the child sent them with the last chunk."""
        return self._drift

    def set_prompt(self, prompt: str, negative_prompt: str | None = None, recache: bool = False) -> None:
        self.owner.send(("prompt", self.stream_id, prompt, negative_prompt, bool(recache)))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.owner.send(("end", self.stream_id))
