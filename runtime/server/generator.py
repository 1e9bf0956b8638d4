"""The two threads behind the stream.

    GeneratorThread  owns the pipeline: iterates `pipe.stream(...)` forever, hands frame chunks to
                     a small FrameBuffer, forwards prompt changes, restarts cleanly after an error.
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
            for chunk in stream:  # uint8 [n, H, W, 3]
                now = time.monotonic()
                # A stream in another process times its own chunks (it may run one chunk ahead).
                seconds = getattr(stream, "last_chunk_seconds", None)
                self.metrics.chunk_generated(len(chunk), now - produced if seconds is None else seconds)
                drift = getattr(stream, "drift_status", None)
                if drift is not None:
                    self.metrics.drift_observed(drift())
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
