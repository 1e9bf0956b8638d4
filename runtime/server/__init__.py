"""`skyrt serve`: endless generated video for browsers, kiosk and signage players.

One generator thread owns the pipeline; one pacer thread holds the output at the configured fps and
runs each encoder once per frame (MJPEG, fragmented MP4, HLS); HTTP handlers only copy bytes out of
bounded, drop-oldest rings, so a slow or stalled client never slows the generator or other clients.
Binds 127.0.0.1 unless told otherwise; `token` guards the control endpoints, which also refuse
foreign origins, foreign Host names and non-JSON bodies; bodies and connections are bounded.

    from skyrt.runtime.server import ServerConfig, serve
    serve(skyrt.load(), {"height": 128, "width": 128, "mode": "kvcache", "ar_step": 4}, ServerConfig(fps=16))
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from typing import TYPE_CHECKING

from .app import create_app
from .connections import ConnectionLimits, guarded_runner, install_log_rate_limit, listen
from .generator_process import PipelineSpec, ProcessPipeline
from .memtrace import start_from_env as start_memory_tracing
from .playlist import Limits, Playlist, PlaylistItem, PromptBoard, PromptChange, RequestError, load_playlist
from .schedule import Schedule, ScheduleEntry, load_schedule, parse_schedule
from .stream_server import FORMATS, ServerConfig, StreamServer

if TYPE_CHECKING:
    from ..resolve import Settings

__all__ = ["FORMATS", "ConnectionLimits", "Limits", "PipelineSpec", "Playlist", "PlaylistItem", "PromptBoard",
           "PromptChange", "RequestError", "Schedule", "ScheduleEntry", "ServerConfig", "StreamServer", "create_app",
           "load_playlist", "load_schedule", "parse_schedule", "serve"]

log = logging.getLogger("skyrt.server")

SHUTDOWN_TIMEOUT_S = 1.0  # after SIGTERM, handlers get this long before they are cancelled


def serve(pipe, sampling: "Settings | dict", config: ServerConfig = ServerConfig(), host: str = "127.0.0.1",
          port: int = 8000, prompt: PromptChange | None = None, playlist: Playlist | None = None, captioner=None,
          caption_every_s: float = 30.0, show_token: bool = False, startup_cancelled=None,
          schedule: "Schedule | None" = None) -> None:
    """Serve an endless stream of `pipe.stream(**sampling)` until SIGINT/SIGTERM, then drain and exit.
    `sampling` is resolved once, against the loaded model, before the stream starts (StreamServer).

    pipe: a `PipelineSpec` (the pipeline is loaded and run in a child process, see
    generator_process.py: what `skyrt serve` does), or a loaded Pipeline (run on a thread here).

    show_token: log the page's URL with the token in it (for a token generated at start: the only
    way the operator learns it).
    startup_cancelled: a threading.Event; set while the model loads, the child is ended and
    StartupInterrupted raised (`skyrt serve` sets it on SIGTERM).
    schedule: a Schedule (schedule.py: `load_schedule`) run by the wall clock instead of a playlist."""
    start_memory_tracing()  # only with $SKYRT_TRACEMALLOC (memtrace.py): soaks looking for growth
    if host_is_name(host) and host.lower() not in config.allowed_hosts:
        config = dataclasses.replace(config, allowed_hosts=(*config.allowed_hosts, host.lower()))
    if isinstance(pipe, PipelineSpec):
        pipe = ProcessPipeline(pipe)
    if isinstance(pipe, ProcessPipeline):
        try:
            pipe.start(startup_cancelled)  # the model loads in the child; a load error is raised here
        except BaseException:
            pipe.stop()
            raise
    try:
        server = StreamServer(pipe, sampling, config, prompt=prompt, playlist=playlist, captioner=captioner,
                              caption_every_s=caption_every_s, schedule=schedule)
        install_log_rate_limit()
        asyncio.run(_serve_until_signalled(server, host, port, show_token, startup_cancelled))
    finally:
        if isinstance(pipe, ProcessPipeline):
            pipe.stop()


def host_is_name(host: str) -> bool:
    """Whether a --host value is a DNS name (not an IP literal or a wildcard address)."""
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
        return False
    except ValueError:
        return bool(host)


async def _serve_until_signalled(server: StreamServer, host: str, port: int, show_token: bool,
                                 startup_cancelled=None) -> None:
    config = server.config
    # Players poll the HLS playlist every second: access lines only with --verbose.
    access_log = logging.getLogger("aiohttp.access") if log.isEnabledFor(logging.DEBUG) else None
    runner = guarded_runner(create_app(server), server.connections, access_log=access_log,
                            shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if startup_cancelled is not None and startup_cancelled.is_set():
        stop.set()  # a SIGTERM landed between the model load and these handlers
    listener = None
    try:
        await runner.setup()
        listener = await listen(runner, host, port, server.connections)
        where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        log.info("serving on %s (%s)", where, ", ".join(
            f"{o.title} " + (" ".join("/" + p for p in o.paths) or "push") for o in server.outputs))
        if config.token is None:
            log.warning("control endpoints are open (--no-token): anyone who can reach %s can change the prompt",
                        where)
        elif show_token:
            log.info("control token generated for this run; open the page with it to switch prompts:\n    %s#token=%s",
                     where, config.token)
        await stop.wait()
        log.info("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if listener is not None:
            listener.close()
        await runner.cleanup()
