"""The two threads behind the stream.

    GeneratorThread  owns the pipeline: iterates `pipe.stream(...)` forever, hands frame chunks to
                     a small FrameBuffer, forwards prompt changes, restarts cleanly after an error,
                     and restarts at a chunk boundary with a new request (`restart_with`: HTTP settings).
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
from typing import Callable

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


class TrialFailed(Exception):
    """A stream opened by `restart_with(..., on_failure=...)` failed before its first chunk."""

    def __init__(self, error: Exception, on_failure: Callable[[Exception], None]):
        super().__init__(str(error))
        self.error, self.on_failure = error, on_failure


class GeneratorThread(threading.Thread):
    """Owns the pipeline (a Pipeline, or a ProcessPipeline whose streams run in a child process).
    `resolution` is the stream's resolved request (runtime/resolve.py): every stream opened runs it,
    with the board's prompt of the moment; `image` / `video` are the stream's start (a video only under a
    causal preset). A prompt change that carries a start of its own (a playlist item's image or video)
    ends the running stream after its current chunk and opens a new one from that start."""

    def __init__(self, pipe, resolution, board: PromptBoard, buffer: FrameBuffer, metrics: Metrics, image=None,
                 video=None):
        super().__init__(name="skyrt-generator", daemon=True)
        self.pipe, self.resolution, self.board, self.buffer, self.metrics = pipe, resolution, board, buffer, metrics
        self.image, self.video = image, video
        self.stop_event = threading.Event()
        self._stream = None
        self._stream_lock = threading.Lock()
        self.active_prompt: str | None = None
        self.running_resolution = None  # the resolution of the stream open now (None between streams)
        self._restart = threading.Event()  # set: end the stream after the chunk in hand, open a new one (new settings, or a change with its own start)
        self._on_failure: Callable[[Exception], None] | None = None  # of a resolution no chunk has proven yet
        # monotonic time the running stream began waiting for its next chunk; None while it is not
        # waiting on the model (loading it, or handing a chunk to a full buffer): StallWatchdog reads it
        self.awaiting_chunk_since: float | None = None
        self.blocks = 0  # chunks generated since the server started, over every stream it opened
        # Called with `blocks` between chunks and before a stream opens (the schedule: schedule.py); a
        # prompt change it makes reaches the stream through the board, before the next chunk is asked for.
        self.between_blocks: Callable[[int], object] | None = None
        board.subscribe(self._forward)

    def restart_with(self, resolution, on_failure: Callable[[Exception], None] | None = None) -> None:
        """Run `resolution` from the next chunk boundary (any thread): the stream ends after the chunk in
        hand, as at an error, and a new one opens with it (the prompt of the moment; a new noise and cache);
        a resolution of the request already running replaces it without a restart.
        on_failure(error) is called, on this thread, if that stream fails before its first chunk (the
        caller puts the resolution it replaced back); then the thread goes on at once, without a backoff."""
        with self._stream_lock:
            if resolution.request == self.resolution.request:  # other sources, the same request: nothing to restart
                self.resolution = resolution
                return
            self.resolution, self._on_failure = resolution, on_failure
            self._restart.set()

    def _forward(self, change: PromptChange) -> None:
        """Board listener: hand a prompt change to the running stream (applies at its next chunk), or for a
        change with a start, have the stream start over from it."""
        if change.start is not None:
            self._restart.set()
            return
        with self._stream_lock:
            if self._stream is not None:
                self._stream.set_prompt(change.prompt, change.negative_prompt, recache=change.transition == "recache")

    def _start_inputs(self, change: PromptChange) -> dict:
        """The stream's start: the change's own (a playlist item's file), else the server's."""
        if change.start is not None:
            kind, path = change.start
            return {kind: path}
        return {k: v for k, v in (("image", self.image), ("video", self.video)) if v is not None}

    def run(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            try:
                self._run_stream()
                failures = 0
            except TrialFailed as failed:  # a new request that cannot run: the caller reverts it
                log.warning("the new settings failed before their first chunk (%s); going back", failed.error)
                self.metrics.generator_failed(failed.error)
                failed.on_failure(failed.error)
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
        with self._stream_lock:
            resolution, on_failure = self.resolution, self._on_failure
            self._restart.clear()
        try:
            self._stream_chunks(resolution, on_failure)
        except Exception as err:
            with self._stream_lock:  # cleared by the first chunk; replaced by a newer restart_with
                untried = on_failure is not None and self._on_failure is on_failure
            if not untried or self.stop_event.is_set():
                raise
            raise TrialFailed(err, on_failure) from err

    def _between_blocks(self) -> None:
        if self.between_blocks is None:
            return
        try:
            self.between_blocks(self.blocks)
        except Exception:  # a broken hook must not stop the stream; the next boundary tries again
            log.exception("the between-blocks hook failed")

    def _stream_chunks(self, resolution, on_failure) -> None:
        self._between_blocks()  # a new stream opens with the prompt of the moment's schedule entry
        change = self.board.current
        request = resolution.with_prompt(change.prompt, change.negative_prompt)
        stream = self.pipe.stream(request=request, **self._start_inputs(change))
        with self._stream_lock:
            self._stream = stream
            self.running_resolution = resolution
        if self.board.current != change:  # switched while the stream was being set up: not lost
            self._forward(self.board.current)
        try:
            produced = time.monotonic()
            for chunk in self._chunks(stream):  # uint8 [n, H, W, 3]
                if on_failure is not None:  # a chunk came: the new request runs, nothing to revert
                    with self._stream_lock:
                        if self._on_failure is on_failure:
                            self._on_failure = None
                    on_failure = None
                now = time.monotonic()
                # A stream in another process times its own chunks (it may run one chunk ahead).
                seconds = getattr(stream, "last_chunk_seconds", None)
                self.metrics.chunk_generated(len(chunk), now - produced if seconds is None else seconds)
                drift = getattr(stream, "drift_status", None)
                if drift is not None:
                    self.metrics.drift_observed(drift())
                self.active_prompt = stream.prompt
                self.blocks += 1
                if not self.buffer.put_chunk(chunk, self.stop_event):
                    return
                self._between_blocks()  # before the restart check: an entry with its own start restarts now
                produced = time.monotonic()
                if self.stop_event.is_set() or self._restart.is_set():
                    return  # stopping, or the run loop opens the stream of the board's new start
        finally:
            with self._stream_lock:
                self._stream = None
                self.running_resolution = None
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
