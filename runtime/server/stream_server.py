"""StreamServer: wires the generator, the pacer, the encoders and the broadcasts together, and
owns their start and stop. The HTTP app (app.py) only reads from it.

    generator thread ─ FrameBuffer ─ pacer thread ─┬─ MjpegEncoder ─ Broadcast("mjpeg") ─ clients
      (pipeline)        (bounded)    (fps clock)   ├─ Fmp4Encoder  ─ Broadcast("mp4")   ─ clients
                                                   ├─ HlsEncoder   ─ HlsWindow (a segment's files) ─ clients
                                                   ├─ LlHlsPackager ─ LlHlsWindow (a part's files) ─ clients
                                                   ├─ WebRtcFeed   ─ Broadcast("webrtc") ─ WHEP peer connections
                                                   └─ Publisher    ─ relay process ─ rtmp:// receiver
Which outputs exist and how each is made: outputs/ (the registry).
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..latents import TEMPORAL_FACTOR
from ..request import GenerationRequest, check_stream_settings
from ..resolve import Settings
from .broadcast import Broadcast
from .connections import ConnectionLimits, ConnectionRegistry
from .generator import FrameBuffer, GeneratorThread, PacerThread, StallWatchdog
from .generator_process import ProcessPipeline
from .hls_window import HlsWindow
from .llhls import PART_TARGET_S, check_part_length, new_window
from .metrics import Metrics, process_resources
from .playlist import Limits, Playlist, PromptBoard, PromptChange
from .outputs import DEFAULT_FORMATS, FORMATS, H264_FORMATS, Encoding, active
from .publish import Publisher, check_publish_url
from .schedule import DEFAULT_TIMEZONE, Schedule, ScheduleRunner, parse_timezone
from .settings_control import SettingsControl
from .state import StateFile, StateSaver, make_hls_folder

log = logging.getLogger("skyrt.server")

SNAPSHOT_STOP_WAIT_S = 10.0  # at a stop: one chunk (the child snapshots between chunks) and the write
GENERATOR_STOP_WAIT_S = 0.5  # how long a stop waits for the generator to finish its chunk


@dataclass(frozen=True)
class ServerConfig:
    """Everything about serving that is not a sampling setting."""

    fps: int | None = None  # None: the stream request's (a preset's 16, else 24); set, it is a user setting
    formats: tuple[str, ...] = DEFAULT_FORMATS  # names of outputs/ (--formats)
    token: str | None = None  # control endpoints need 'Authorization: Bearer <token>' when set
    max_body_bytes: int = 64 * 1024
    limits: Limits = field(default_factory=Limits)
    client_buffer_s: float = 2.0  # each client may fall this far behind before it drops the oldest
    write_timeout_s: float = 20.0  # a client whose socket accepts nothing this long is cut off
    # Kernel send buffer of a stream socket. Fixed (Linux otherwise grows it to 4 MiB per socket), so a
    # client that stops reading is noticed within seconds and holds little kernel memory; the drop-oldest
    # ring above is where a slow client's backlog belongs.
    stream_send_buffer_bytes: int = 256 * 1024
    frame_buffer: int = 0  # generator -> pacer frames; 0: half a second of frames
    jpeg_quality: int = 85
    hls_list_size: int = 6
    # Host names (besides IP literals and localhost) control requests may name: the bound name, a
    # reverse proxy's public name. Guards against DNS rebinding; see guard.py.
    allowed_hosts: tuple[str, ...] = ()
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    state_path: Path | None = None  # --state FILE: the prompt and playlist survive a restart
    publish: tuple[str, ...] = ()  # --publish URL: push targets (rtmp://HOST/APP/KEY), see publish.py
    ll_hls_part_s: float = PART_TARGET_S  # low-latency HLS beside HLS (/llhls/), parts this long; 0: off
    max_webrtc_sessions: int = 64  # WHEP sessions at once (each holds UDP sockets and a DTLS context)
    generator_stall_s: float = 0.0  # --generator-stall: restart a generator with no chunk this long; 0: off
    # WHEP sessions at once from one client address, so one client cannot take every session (behind a
    # reverse proxy every offer comes from the proxy's address: raise it to max_webrtc_sessions there).
    max_webrtc_sessions_per_address: int = 4
    timezone: str = DEFAULT_TIMEZONE  # --timezone: a schedule's zone when it names none (schedule.py)

    def __post_init__(self):
        try:
            parse_timezone(self.timezone, "--timezone")
        except ValueError as err:  # RequestError is a ValueError; a config error is the caller's
            raise ValueError(str(err)) from None
        if not self.generator_stall_s >= 0:
            raise ValueError(f"--generator-stall must be seconds >= 0 (0: off), got {self.generator_stall_s}")
        if self.fps is not None and not 1 <= self.fps <= 120:
            raise ValueError(f"fps must be in 1..120, got {self.fps}")
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {list(FORMATS)}, got {list(self.formats)}")
        if self.token is not None and not self.token:
            raise ValueError("token must not be empty (leave it unset to keep control endpoints open)")
        if self.stream_send_buffer_bytes < 4096:
            raise ValueError(f"the send buffer must be at least 4 KiB, got {self.stream_send_buffer_bytes} bytes")
        for url in self.publish:
            check_publish_url(url)
        if self.ll_hls_part_s:
            check_part_length(self.ll_hls_part_s)  # the fps (the request's) is not known yet
        if self.publish and not set(H264_FORMATS) & set(self.formats):
            raise ValueError(f"--publish pushes the H.264 encode of an H.264 output: keep "
                             f"{', '.join(H264_FORMATS[:-1])} or {H264_FORMATS[-1]} in --formats "
                             f"(got {','.join(self.formats)})")
        if self.max_webrtc_sessions < 1:
            raise ValueError(f"max_webrtc_sessions must be >= 1, got {self.max_webrtc_sessions}")
        if self.max_webrtc_sessions_per_address < 1:
            raise ValueError(f"max_webrtc_sessions_per_address must be >= 1, got "
                             f"{self.max_webrtc_sessions_per_address}")


class StreamServer:
    """One endless stream: `start(loop)` after the event loop runs, `stop()` to drain and exit."""

    def __init__(self, pipe, sampling: Settings | dict, config: ServerConfig = ServerConfig(),
                 prompt: PromptChange | None = None, playlist: Playlist | None = None, captioner=None,
                 caption_every_s: float = 30.0, schedule: Schedule | None = None, clock=None):
        """pipe: a Pipeline, or a started ProcessPipeline (anything with `resolve` and `stream(request=...)`).
        sampling: the stream's settings as the user set them (a dict: API keywords; `skyrt serve` gives
        a Settings with its own defaults), plus an optional `image` input. They are resolved here, once,
        against the loaded model (runtime/resolve.py): every stream the server opens, in this process or
        in the generator child, runs that request, with the prompt of the moment.
        captioner: a `skyrt.runtime.captioner.Captioner`; with one, the stream is captioned every
        `caption_every_s` seconds (GET /caption).
        schedule: a Schedule (schedule.py) to run by the wall clock; not with `playlist` (make the playlist an
        entry's). clock: the schedule's `now()` (aware datetimes; default the system clock): tests pass a fake."""
        if schedule is not None and playlist is not None and playlist.items:
            raise ValueError("give a schedule or a playlist, not both (--schedule with --playlist): a schedule "
                             "entry may run a playlist, {\"at\": \"07:00\", \"playlist\": {\"items\": [...]}}")
        settings = Settings.of(sampling)
        if "prompt" in settings.user:
            raise ValueError("pass the prompt as `prompt=PromptChange(...)`, not inside `sampling`")
        # the request type's stream settings (and the start: `image`, or `video` under a preset), nothing else
        check_stream_settings(settings.user, inputs=("image", "video"))
        user = dict(settings.user)
        self.image, self.video = user.pop("image", None), user.pop("video", None)
        if config.fps is not None:  # the server's fps is the stream's
            if user.get("fps", config.fps) != config.fps:
                raise ValueError(f"fps={user['fps']} in the settings and ServerConfig(fps={config.fps}) disagree; "
                                 "give it once")
            user["fps"] = config.fps
        first = prompt or PromptChange("a red circle bouncing on a dark blue background")
        user["prompt"] = first.prompt
        if first.negative_prompt is not None:
            user["negative_prompt"] = first.negative_prompt
        self.pipe = pipe
        self.settings = replace(settings, user=user)  # what HTTP control (settings_control.py) resolves over
        self.resolution = pipe.resolve(self.settings, stream=True)
        self.request: GenerationRequest = self.resolution.request
        self.config = config = replace(config, fps=self.request.fps)
        self.height, self.width = self.request.height, self.request.width
        self.metrics = Metrics()
        self.connections = ConnectionRegistry(config.connections)
        self.limits = self._limits_for(self.request)
        self.board = PromptBoard(first, playlist)
        self.schedule = ScheduleRunner(self.board, clock, config.timezone)
        self.schedule.set(schedule)
        self.state = StateFile(config.state_path) if config.state_path is not None else None
        # A start after another with the same --state: HLS media sequences go on (see llhls.LlHlsWindow).
        self.restarted = self.state is not None and self.state.path.exists()
        self._saver: StateSaver | None = None
        if self.state is not None:
            self.state.restore(self.board, self.limits)
            self._saver = StateSaver(self.state, self.board)
            self.board.on_playlist_step(self._saver.mark_dirty)
            # A saved schedule replaces --schedule, as a saved playlist replaces --playlist.
            self.schedule.restore(self.state.load(), self.limits)
            self.schedule.on_switch = self._saver.mark_dirty
            self.state.sections["schedule"] = self.schedule.snapshot
        self.schedule.select_now()  # the entry active now shows from the first block (a kept one stays)
        self.buffer = FrameBuffer(config.frame_buffer or max(4, config.fps // 2))
        capacity = max(2, int(config.client_buffer_s * config.fps))
        self.outputs = active(config)  # outputs/: what runs, in the order the pacer encodes
        self.broadcasts = {o.name: Broadcast(o.name, capacity, needs_keyframe=o.broadcast == "keyframes")
                           for o in self.outputs if o.broadcast}
        self.hls_folder = make_hls_folder()  # reaps the folders of servers that died first
        self.hls_window = HlsWindow(self.hls_folder)  # what HTTP serves: the HLS files in memory
        self.llhls_window = (new_window(config.fps, config.ll_hls_part_s, first_msn=int(time.time()) if self.restarted
                                        else 0, discontinuity=self.restarted)
                             if "hls" in config.formats and config.ll_hls_part_s else None)
        self.captioner = None
        if captioner is not None:
            from .captioning import LiveCaptioner

            self.captioner = LiveCaptioner(captioner, caption_every_s, self._frame_on_screen)
        self.generator = GeneratorThread(pipe, self.resolution, self.board, self.buffer, self.metrics, image=self.image,
                                         video=self.video)
        self.generator.between_blocks = self.schedule.check
        self.metrics.sections.append(self.schedule.prometheus)
        self.metrics.sections.append(self._snapshot_prometheus)
        self.settings_control = SettingsControl(self)
        if self.state is not None:
            self.state.sections["settings"] = self.settings_control.snapshot
            self.settings_control.restore(self.state.load())
        self.stall_watchdog = (StallWatchdog(self.generator, self.config.generator_stall_s, self.metrics)
                               if self.config.generator_stall_s > 0 else None)
        self.pacer: PacerThread | None = None
        self._encoders: list = []
        self.publishers: list[Publisher] = []  # made by outputs/rtmp.py
        self.whep = None  # outputs/webrtc.py's WhepSessions, made with the app's routes
        for output in self.outputs:
            if output.prometheus is not None:
                self.metrics.sections.append(lambda output=output: output.prometheus(self))
        self._stopped = False

    def adopt(self, resolution, on_failure=None) -> None:
        """Run `resolution` from the generator's next chunk boundary (HTTP control: settings_control.py);
        on_failure: see GeneratorThread.restart_with."""
        self.resolution, self.request = resolution, resolution.request
        self.limits = self._limits_for(self.request)
        self.generator.restart_with(resolution, on_failure)

    def _limits_for(self, request: GenerationRequest) -> Limits:
        """The control limits, a playlist item no shorter than one generated chunk of `request`."""
        limits = self.config.limits
        return replace(limits, min_duration_s=max(limits.min_duration_s, block_seconds(request)))

    def _frame_on_screen(self):
        return None if self.pacer is None else self.pacer.last_frame

    def _make_encoders(self) -> list:
        """Every active output's encoders, in registry order (H.264 leaders before their followers)."""
        encoding = Encoding(self, self.config.fps, self.width, self.height)
        encoders: list = []
        for output in self.outputs:
            encoders.extend(output.make_encoders(encoding))
        return encoders

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for broadcast in self.broadcasts.values():
            broadcast.bind(loop)
        self._encoders = self._make_encoders()
        self.pacer = PacerThread(self.config.fps, self.buffer, self._encoders, self.board, self.metrics)
        self.generator.start()
        self.pacer.start()
        if self.stall_watchdog is not None:
            self.stall_watchdog.start()
        if self._saver is not None:
            self._saver.start()
            self._saver.mark_dirty()  # the file exists (and names this run's state) from the start
        if self.captioner is not None:
            self.captioner.start()
        log.info("stream started: %dx%d at %d fps, outputs %s; HLS files in %s", self.width, self.height,
                 self.config.fps, ",".join(self.config.formats), self.hls_folder)

    def stop(self) -> None:
        """Drain: end client streams, stop both threads, close encoders, remove the HLS folder."""
        if self._stopped:
            return
        self._stopped = True
        for broadcast in self.broadcasts.values():
            broadcast.close()
        if self.captioner is not None:
            self.captioner.stop()
        # --state (or a fleet stream): the stream resumes from here (asked before the generator ends its
        # stream). A ProcessPipeline's child writes it, a fleet GPU worker's RemotePipeline its worker.
        snapshot_now = getattr(self.pipe, "snapshot_now", None)
        if snapshot_now is not None and snapshot_now(SNAPSHOT_STOP_WAIT_S):
            log.info("wrote the stream snapshot for the next start")
        self.generator.stop()
        if self.stall_watchdog is not None:
            self.stall_watchdog.stop()
        if self.pacer is not None:
            self.pacer.stop()
            self.pacer.join(timeout=5)
        # A chunk in flight is lost either way; waiting for it would make a stop as slow as the
        # slowest DiT call. The generator is a daemon thread: past this wait the process leaves it.
        if isinstance(self.pipe, ProcessPipeline):
            self.pipe.stop()  # the child is killed; a chunk it was making is lost, as below
        self.generator.join(timeout=GENERATOR_STOP_WAIT_S)
        if self.generator.is_alive():
            log.info("left the chunk in flight unfinished (stopping within %.1f s)", GENERATOR_STOP_WAIT_S)
        for encoder in self._encoders:
            encoder.close()
        if self._saver is not None and self._saver.is_alive():
            self._saver.stop()
        shutil.rmtree(self.hls_folder, ignore_errors=True)
        log.info("stream stopped after %d output frames", self.metrics.frames_output)

    def save_state(self) -> None:
        """Write the control state now (after an HTTP change: a 200 means it is on disk)."""
        if self.state is not None:
            self.state.save(self.board)

    def health(self) -> dict:
        pacer_alive = self.pacer is not None and self.pacer.is_alive()
        return {"ok": self.generator.is_alive() and pacer_alive, "generator_alive": self.generator.is_alive(),
                "pacer_alive": pacer_alive, "frames_output": self.metrics.frames_output}

    def status(self) -> dict:
        rss, fds = process_resources()
        change = self.board.current
        return dict(
            self.metrics.snapshot(),
            prompt=change.prompt,
            negative_prompt=change.negative_prompt,
            prompt_active=self.generator.active_prompt,
            prompt_switches=self.board.switches,
            playlist=self.board.playlist_json()["position"],
            schedule=self.schedule.status(),
            fps=self.config.fps,
            width=self.width,
            height=self.height,
            mode=self.request.mode,
            formats=list(self.config.formats),
            outputs=[output.describe() for output in self.outputs],
            frame_buffer=len(self.buffer),
            caption=None if self.captioner is None else self.captioner.latest()["caption"],
            connections={"open": self.connections.count, "refused": self.connections.refused,
                         "idle_shed": self.connections.shed},
            resident_memory_bytes=rss,
            open_fds=fds,
            generator_process=self._generator_process(),
            publish=[],  # (the outputs' own figures below replace these two when they are on)
            hls_requests=None,
            time=time.time(),
        ) | self._output_status()


    def _output_status(self) -> dict:
        merged: dict = {}
        for output in self.outputs:
            if output.status is not None:
                merged.update(output.status(self))
        return merged

    def _generator_process(self) -> dict | None:
        """The child process that runs the pipeline (None when it runs in this process); a fleet stream's GPU
        worker (runtime/fleet/gpu_worker.py) describes itself."""
        if not isinstance(self.pipe, ProcessPipeline):
            describe = getattr(self.pipe, "generator_status", None)
            return None if describe is None else describe()
        pid = self.pipe.pid
        rss = process_resources(pid)[0] if pid is not None else -1
        return {"pid": pid, "starts": self.pipe.starts, "resident_memory_bytes": rss, "threads": self.pipe.threads,
                "snapshots": self.pipe.snapshot_figures()}

    def _snapshot_prometheus(self) -> str:
        """Streams resumed from a snapshot and snapshots refused (a fresh start), when snapshots are on."""
        figures = getattr(self.pipe, "snapshot_figures", lambda: None)()
        if figures is None:
            return ""
        return ("# HELP skyrt_snapshot_resumes_total Streams resumed from the stream snapshot.\n"
                f"# TYPE skyrt_snapshot_resumes_total counter\nskyrt_snapshot_resumes_total {figures['resumes']}\n"
                "# HELP skyrt_snapshot_refusals_total Stream snapshots refused (the stream started fresh).\n"
                f"# TYPE skyrt_snapshot_refusals_total counter\nskyrt_snapshot_refusals_total {figures['refusals']}\n")


def block_seconds(req: GenerationRequest) -> float:
    """Seconds of output one generated chunk covers: a prompt change can show no sooner than this.
    kvcache mode: a block of `causal_block_size` latent frames; window mode: a window's new frames."""
    if req.mode == "window":
        frames = req.base_num_frames - (req.overlap_history or 0)
    else:
        frames = TEMPORAL_FACTOR * req.causal_block_size
    return max(1, frames) / req.fps
