"""The two threads behind the stream.

    GeneratorThread  owns the pipeline: iterates `pipe.stream(...)` forever, hands frame chunks to
                     a small FrameBuffer, forwards prompt changes, restarts cleanly after an error.
    StallWatchdog    (--generator-stall SECONDS) a generator that has been waiting that long for its
                     next chunk (a hung driver, a deadlock in native code) has its child process
                     killed: the generator thread sees a dead child and restarts it, as after a crash.
    PacerThread      takes one frame per 1/fps tick (repeating the last one when generation is
                     late, so players never stall), ticks the playlist, and runs every encoder once.

The buffer is small on purpose: the generator blocks when it is full, so a prompt switch reaches the
screen within about one chunk plus `capacity` frames instead of after minutes of buffered video.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np

from .metrics import Metrics
from .playlist import PromptBoard, PromptChange

log = logging.getLogger("skyrt.server")

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # consecutive failures wait longer


class FrameBuffer:
    """Bounded hand-off of uint8 frames [H, W, 3] from the generator to the pacer."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._frames: deque[np.ndarray] = deque()
        self._cond = threading.Condition()

    def put_chunk(self, frames: np.ndarray, stop: threading.Event) -> bool:
        """Wait for room, then append every frame of a chunk [n, H, W, 3]; False if stopped first."""
        with self._cond:
            while len(self._frames) >= self.capacity:
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
            self._frames.extend(frames)
            self._cond.notify_all()
        return True

    def take(self, timeout: float = 0.0) -> np.ndarray | None:
        """The next frame, waiting up to `timeout` seconds; None if there is none."""
        with self._cond:
            if not self._frames and timeout > 0:
                self._cond.wait(timeout)
            if not self._frames:
                return None
            frame = self._frames.popleft()
            self._cond.notify_all()
            return frame

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)


class GeneratorThread(threading.Thread):
    """Owns the pipeline (a Pipeline, or a ProcessPipeline whose streams run in a child process).
    `resolution` is the stream's resolved request (runtime/resolve.py): every stream opened runs it,
    with the board's prompt of the moment; `image` is the stream's input."""

    def __init__(self, pipe, resolution, board: PromptBoard, buffer: FrameBuffer, metrics: Metrics, image=None):
        super().__init__(name="skyrt-generator", daemon=True)
        self.pipe, self.resolution, self.board, self.buffer, self.metrics = pipe, resolution, board, buffer, metrics
        self.image = image
        self.stop_event = threading.Event()
        self._stream = None
        self._stream_lock = threading.Lock()
        self.active_prompt: str | None = None
        # monotonic time the running stream began waiting for its next chunk; None while it is not
        # waiting on the model (loading it, or handing a chunk to a full buffer): StallWatchdog reads it
        self.awaiting_chunk_since: float | None = None
        board.subscribe(self._forward)

    def _forward(self, change: PromptChange) -> None:
        """Board listener: hand a prompt change to the running stream (applies at its next chunk)."""
        with self._stream_lock:
            if self._stream is not None:
                self._stream.set_prompt(change.prompt, change.negative_prompt, recache=change.transition == "recache")

    def run(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            try:
                self._run_stream()
                failures = 0
            except Exception as err:  # the last good frame stays on screen; start over from a clean state
                if self.stop_event.is_set():
                    return  # stopping: the stream was cut off on purpose
                log.exception("generator failed; restarting from a clean state")
                self.metrics.generator_failed(err)
                self.stop_event.wait(RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)])
                failures += 1
                with self.metrics.lock:
                    self.metrics.generator_restarts += 1

    def _run_stream(self) -> None:
        change = self.board.current
        request = self.resolution.with_prompt(change.prompt, change.negative_prompt)
        stream = self.pipe.stream(request=request, image=self.image)
        with self._stream_lock:
            self._stream = stream
        if self.board.current != change:  # switched while the stream was being set up: not lost
            self._forward(self.board.current)
        try:
            produced = time.monotonic()
            for chunk in self._chunks(stream):  # uint8 [n, H, W, 3]
                now = time.monotonic()
                # A stream in another process times its own chunks (it may run one chunk ahead).
                seconds = getattr(stream, "last_chunk_seconds", None)
                self.metrics.chunk_generated(len(chunk), now - produced if seconds is None else seconds)
                self.active_prompt = stream.prompt
                if not self.buffer.put_chunk(chunk, self.stop_event):
                    return
                produced = time.monotonic()
                if self.stop_event.is_set():
                    return
        finally:
            with self._stream_lock:
                self._stream = None
            stream.close()

    def _chunks(self, stream):
        """The stream's chunks, with `awaiting_chunk_since` set while each but the first is awaited: the
        first includes the stream's warm-up (and a new child's first step), which may take far longer
        than a chunk, and judging it would kill a slow start over and over."""
        first = True
        while True:
            self.awaiting_chunk_since = None if first else time.monotonic()
            first = False
            try:
                chunk = next(stream)
            except StopIteration:
                return
            finally:
                self.awaiting_chunk_since = None
            yield chunk

    def stop(self) -> None:
        self.stop_event.set()


class StallWatchdog(threading.Thread):
    """Restarts a generator that has produced no chunk for `stall_s` seconds while waiting on the model.
    The pacer keeps repeating the last frame meanwhile (viewers see it held, not a broken stream).
    Needs the pipeline in a child process (ProcessPipeline.kill_child): a thread cannot be killed."""

    def __init__(self, generator: GeneratorThread, stall_s: float, metrics: Metrics, period_s: float | None = None):
        super().__init__(name="skyrt-stall-watchdog", daemon=True)
        self.generator, self.stall_s, self.metrics = generator, stall_s, metrics
        self.period_s = min(1.0, stall_s / 4) if period_s is None else period_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.period_s):
            since = self.generator.awaiting_chunk_since
            if since is not None and time.monotonic() - since > self.stall_s:
                self._restart(time.monotonic() - since)

    def _restart(self, waited: float) -> None:
        kill = getattr(self.generator.pipe, "kill_child", None)
        log.error("generator produced no frame for %.1f s (--generator-stall %g): %s", waited, self.stall_s,
                  "restarting its process" if kill else "cannot restart an in-process pipeline")
        with self.metrics.lock:
            self.metrics.generator_stalls += 1
        if kill is None:
            self.stop_event.set()  # counted once; nothing else to do
            return
        self.generator.awaiting_chunk_since = None  # one restart per stall
        kill()

    def stop(self) -> None:
        self.stop_event.set()


class PacerThread(threading.Thread):
    """Emits exactly `fps` frames per second of wall time to every encoder."""

    def __init__(self, fps: int, buffer: FrameBuffer, encoders: list, board: PromptBoard, metrics: Metrics):
        super().__init__(name="skyrt-pacer", daemon=True)
        self.fps, self.buffer, self.encoders, self.board, self.metrics = fps, buffer, encoders, board, metrics
        self.stop_event = threading.Event()
        self.last_frame: np.ndarray | None = None
        self.frames_out = 0
        self._failed: set[str] = set()  # encoders whose failure was logged (log once, count always)

    def run(self) -> None:
        period = 1.0 / self.fps
        while self.last_frame is None and not self.stop_event.is_set():  # nothing to show before the first frame
            self.last_frame = self.buffer.take(timeout=0.1)
        if self.last_frame is None:
            return
        self._emit(self.last_frame, repeated=False)
        next_due = time.monotonic() + period
        while not self.stop_event.is_set():
            delay = next_due - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)
            elif delay < -1.0:  # over a second behind (machine stalled): restart the clock, do not burst
                next_due = time.monotonic()
                with self.metrics.lock:
                    self.metrics.pacer_resyncs += 1
            frame = self.buffer.take()
            repeated = frame is None
            if not repeated:
                self.last_frame = frame
            self._emit(self.last_frame, repeated)
            next_due += period

    def _emit(self, frame: np.ndarray, repeated: bool) -> None:
        for encoder in self.encoders:
            try:
                encoder.encode(frame, repeated)  # H.264 encodes every tick; MJPEG only new frames
            except Exception:  # one broken output must not take the others down
                if encoder.name not in self._failed:
                    self._failed.add(encoder.name)
                    log.exception("%s encoder failed (further failures are only counted)", encoder.name)
                with self.metrics.lock:
                    self.metrics.encoder_errors += 1
        self.metrics.frame_output(repeated)
        self.frames_out += 1
        self.board.tick(self.frames_out / self.fps)

    def stop(self) -> None:
        self.stop_event.set()
