"""One stream of a fleet, as a `skyrt serve` inside a process it does not own (a Ray actor): no Ray here.

    StreamHost thread ── loads the pipeline in its child process (generator_process.py), then runs a
                         StreamServer and its aiohttp app on the node's address, port chosen by the OS
      ├─ watchdog      ── a generator in a fault loop, a dead generator or pacer thread, or no new
      │                   frame for `stall_s`: calls `on_fatal` (the actor exits; Ray restarts it)
      ├─ control push  ── the prompt, the playlist position, the schedule (schedule.py) and the HTTP
      │                   settings layer (/settings, settings_control.py) go to `on_control` after every
      │                   control request (before its 200), every playlist step or schedule switch, and
      │                   every `position_push_s`
      └─ snapshots     ── with `snapshot_dir`, the generator keeps the stream state in
                          `<snapshot_dir>/<id>.stream.npz` (runtime/server/resume.py, the file `skyrt serve
                          --state` keeps) every `snapshot_every` seconds and at the stop, and a restarted
                          stream continues from it; one that does not fit is refused (logged, counted in
                          /status generator_process.snapshots and /metrics) and the stream starts fresh

The pipeline child is started from this long-lived thread on purpose: it dies with the thread that
made it (PR_SET_PDEATHSIG), and this thread lives as long as the stream.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, replace

from ..server.playlist import RequestError, parse_playlist
from .config import StreamConfig, check_serve_flags

log = logging.getLogger("skyrt.fleet")

FAULT_LIMIT = 3  # generator failures in a row, without a frame between them: a fault loop
WATCH_PERIOD_S = 1.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HostSettings:
    bind: str = "127.0.0.1"  # the node's address (the actor binds the IP Ray knows the node by)
    stall_s: float = 120.0  # no new generated frame for this long after the first one is fatal
    position_push_s: float = 5.0  # the playlist's elapsed time is pushed at least this often
    snapshot_dir: str | None = None  # the fleet's stream snapshots (store.py); None: no snapshots


def cross_origin_video(request, response) -> None:
    """Video bytes may be read from pages of other origins: behind a fleet ingress in redirect mode
    the page comes from the ingress and the video from this node (hls.js fetches segments, the
    player page samples MJPEG pixels). Control endpoints get no such header."""
    path = request.path
    if request.method in ("GET", "HEAD") and (path in ("/stream.mjpg", "/stream.mp4") or path.startswith("/hls/")):
        response.headers["Access-Control-Allow-Origin"] = "*"


async def _on_response_prepare(request, response) -> None:
    cross_origin_video(request, response)


class StreamHost(threading.Thread):
    """Runs one stream of the fleet until `stop()`. `phase` moves loading -> running (or failed,
    with `error`); `address` is (host, port) once the HTTP server listens."""

    def __init__(self, stream: StreamConfig, token: str | None, allowed_hosts: tuple[str, ...] = (),
                 control: dict | None = None, settings: HostSettings = HostSettings(),
                 on_control=lambda snapshot: None, on_fatal=lambda reason: None, pipe=None, make_pipe=None):
        """control: a saved control snapshot to resume (`control_snapshot()`: prompt, playlist and its
        position, HTTP settings layer), else the config's prompt and playlist. pipe: a loaded pipeline
        to use instead of a child process (tests). make_pipe: PipelineSpec -> a pipeline to `start()`
        instead of the child process (a GPU worker's RemotePipeline, gpu_worker.py)."""
        super().__init__(name=f"skyrt-stream-{stream.id}", daemon=True)
        self.stream, self.token, self.allowed_hosts = stream, token, allowed_hosts
        self.control, self.settings = control, settings
        self.on_control, self.on_fatal = on_control, on_fatal
        self.phase = "loading"
        self.error: str | None = None
        self.address: tuple[str, int] | None = None
        self.server = None
        self._pipe = pipe
        self._make_pipe = make_pipe
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serve_done: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._control_dirty = threading.Event()
        self._last_pushed: dict | None = None
        self._last_push_time = 0.0

    # ------------------------------------------------------------------------------------ build
    def _build_server(self):
        """The StreamServer for this stream, built as `skyrt serve` builds its own."""
        from ..cli import pipeline_spec, serve_sampling, server_config
        from ..resolve import FLEET_YAML
        from ..server import ProcessPipeline, StreamServer

        args = check_serve_flags(self.stream)
        sampling, prompt = serve_sampling(args, FLEET_YAML)  # the YAML's keys are the user's settings
        config = replace(server_config(args, self.token), allowed_hosts=tuple(args.allowed_host) + self.allowed_hosts)
        # WHEP offers reach this server through the ingress, all from its address: no per-address cap here.
        config = replace(config, max_webrtc_sessions_per_address=config.max_webrtc_sessions)
        prompt = replace(prompt, prompt=self.stream.prompt)
        if self._pipe is None:
            self._pipe = (self._make_pipe or ProcessPipeline)(self._pipeline_spec(pipeline_spec(args)))
            self._pipe.start(self._stop_requested)  # the model loads in the child; a load error is raised here
        host = self

        class FleetStreamServer(StreamServer):
            def save_state(self) -> None:
                """After a control request, before its 200: the change reaches the fleet's state."""
                super().save_state()
                host.push_control(force=True)

        playlist = parse_playlist(self.stream.playlist) if self.stream.playlist else None
        server = FleetStreamServer(self._pipe, sampling, config, prompt=prompt, playlist=playlist)
        if self.control is not None:
            try:
                server.board.restore(self.control, server.limits)
                log.info("stream %s resumed its saved prompt and playlist position", self.stream.id)
            except RequestError as err:
                log.warning("stream %s: ignoring its saved control state (%s)", self.stream.id, err)
            # The /settings layer saved beside it: resolved again over this start's settings, and one that
            # no longer resolves (the fleet YAML changed the stream) is logged and left out.
            server.settings_control.restore(self.control)
            # The schedule saved with it (PUT /schedule) runs again: the entry active now shows from the first block.
            if server.schedule.restore(self.control, server.limits):
                server.schedule.select_now()
        server.board.on_playlist_step(self._control_dirty.set)
        server.schedule.on_switch = self._control_dirty.set
        return server

    def _pipeline_spec(self, spec):
        """`skyrt serve`'s spec for this stream, with its snapshot in the fleet's snapshot folder."""
        from .store import stream_snapshot_path

        if self.settings.snapshot_dir is None:
            return spec
        path = stream_snapshot_path(self.settings.snapshot_dir, self.stream.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        return replace(spec, snapshot_path=str(path))

    def control_snapshot(self) -> dict:
        """What the fleet keeps for this stream: the board's snapshot (prompt, playlist and position), the
        schedule and the HTTP settings layer under "schedule" and "settings", the keys a `skyrt serve
        --state` file holds."""
        if self.server is None:
            return {}
        return {**self.server.board.snapshot(), "schedule": self.server.schedule.snapshot(),
                "settings": self.server.settings_control.snapshot()}

    # -------------------------------------------------------------------------------------- run
    def run(self) -> None:
        try:
            self.server = self._build_server()
        except BaseException as err:  # a model that does not load: reported, never restarted in a loop
            self.phase, self.error = "failed", f"{type(err).__name__}: {err}"
            log.error("stream %s failed to start: %s", self.stream.id, self.error)
            if self._pipe is not None and hasattr(self._pipe, "stop"):
                self._pipe.stop()
            return
        try:
            asyncio.run(self._serve())
        except BaseException as err:
            self.phase, self.error = "failed", f"{type(err).__name__}: {err}"
            log.exception("stream %s stopped on an error", self.stream.id)
            self.on_fatal(f"server loop failed: {self.error}")
        finally:
            if hasattr(self._pipe, "stop"):
                self._pipe.stop()

    async def _serve(self) -> None:
        from ..server import create_app
        from ..server.connections import bound_address, guarded_runner, install_log_rate_limit, listen

        install_log_rate_limit()
        self._loop, self._serve_done = asyncio.get_running_loop(), asyncio.Event()
        app = create_app(self.server)
        app.on_response_prepare.append(_on_response_prepare)
        runner = guarded_runner(app, self.server.connections, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        listener = None
        try:
            listener = await listen(runner, self.settings.bind, 0, self.server.connections)
            host, port = bound_address(listener)
            self.address = (host, port)
            self.phase = "running"
            log.info("stream %s serving on http://%s:%d/", self.stream.id, host, port)
            if self._stop_requested.is_set():
                return
            watch = asyncio.create_task(self._watch())
            await self._serve_done.wait()
            watch.cancel()
        finally:
            self.phase = "stopped" if self._stop_requested.is_set() else self.phase
            if listener is not None:
                listener.close()
            await runner.cleanup()
            self.push_control(force=True)

    # ---------------------------------------------------------------------------- watch & push
    async def _watch(self) -> None:
        """Fault checks and the periodic control push, once a second on the server's loop."""
        frames, errors_at_frame, last_frame_time = -1, 0, time.monotonic()
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            snap = self.server.metrics.snapshot()
            now = time.monotonic()
            if snap["frames_generated"] != frames:
                frames, errors_at_frame, last_frame_time = snap["frames_generated"], snap["generator_errors"], now
            reason = fault_reason(self.server.health(), snap, errors_at_frame, now - last_frame_time,
                                  self.settings.stall_s)
            if reason is not None:
                log.error("stream %s: %s; leaving so that Ray restarts it", self.stream.id, reason)
                self.phase, self.error = "faulted", reason
                await asyncio.to_thread(self.push_control, True)
                self.on_fatal(reason)
                return
            due = self._control_dirty.is_set() or now - self._last_push_time >= self.settings.position_push_s
            if due:
                self._control_dirty.clear()
                await asyncio.to_thread(self.push_control)

    def push_control(self, force: bool = False) -> None:
        """Hand the control snapshot to `on_control` if it changed (or `force`)."""
        if self.server is None:
            return
        snapshot = self.control_snapshot()
        if force or snapshot != self._last_pushed:
            try:
                self.on_control(snapshot)
                self._last_pushed = snapshot
            except Exception as err:  # the fleet's controller restarting: the next push carries it
                log.warning("stream %s could not save its control state: %s", self.stream.id, err)
        self._last_push_time = time.monotonic()

    # ------------------------------------------------------------------------------------ reads
    @property
    def pipe(self):
        """The pipeline the stream runs on (None before the build starts)."""
        return self._pipe

    def info(self) -> dict:
        """The stream's phase, address and figures (JSON-able)."""
        info = {"id": self.stream.id, "phase": self.phase, "error": self.error,
                "address": None if self.address is None else list(self.address)}
        if self.server is not None and self.phase == "running":
            status = self.server.status()
            info["status"] = {key: status[key] for key in (
                "fps", "generated_fps", "frames_generated", "frames_output", "clients", "prompt", "prompt_active",
                "playlist", "generator_errors", "generator_restarts", "time_to_first_frame_s", "width", "height")}
        return info

    def stop(self) -> None:
        """End the stream (any thread): clients cut off, threads stopped, child killed."""
        self._stop_requested.set()
        loop, stop = self._loop, self._serve_done
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        if self._pipe is not None and hasattr(self._pipe, "stop") and self.server is None:
            self._pipe.stop()  # still loading
        self.join(timeout=STOP_TIMEOUT_S)


def fault_reason(health: dict, snap: dict, errors_at_last_frame: int, seconds_since_frame: float,
                 stall_s: float) -> str | None:
    """Why a running stream cannot recover by itself (None: it is fine or recovering):
    a dead generator or pacer thread, FAULT_LIMIT generator failures since the last new frame, or
    no new frame for `stall_s` seconds after the first one."""
    if not health["generator_alive"] or not health["pacer_alive"]:
        dead = [name for name in ("generator", "pacer") if not health[f"{name}_alive"]]
        return f"{' and '.join(dead)} thread died"
    failures = snap["generator_errors"] - errors_at_last_frame
    if failures >= FAULT_LIMIT:
        return f"generator fault loop: {failures} failures without a frame (last: {snap['last_error']})"
    if snap["frames_generated"] > 0 and seconds_since_frame > stall_s:
        return f"no new frame for {seconds_since_frame:.0f} s (limit {stall_s:g} s)"
    return None
