"""`skyrt serve`: endless generated video for browsers, kiosk and signage players.

One generator thread owns the pipeline; one pacer thread holds the output at the configured fps and
runs each encoder once per frame (MJPEG, fragmented MP4, HLS); HTTP handlers only copy bytes out of
bounded, drop-oldest rings, so a slow or stalled client never slows the generator or other clients.
Binds 127.0.0.1 unless told otherwise; `token` guards the control endpoints; bodies are bounded.

    from skyrt.runtime.server import ServerConfig, serve
    serve(skyrt.load(), {"height": 128, "width": 128, "mode": "kvcache", "ar_step": 4}, ServerConfig(fps=16))
"""
from __future__ import annotations

import logging

from .app import create_app
from .playlist import Limits, Playlist, PlaylistItem, PromptBoard, PromptChange, RequestError, load_playlist
from .stream_server import FORMATS, ServerConfig, StreamServer

__all__ = ["FORMATS", "Limits", "Playlist", "PlaylistItem", "PromptBoard", "PromptChange", "RequestError",
           "ServerConfig", "StreamServer", "create_app", "load_playlist", "serve"]

log = logging.getLogger("skyrt.server")


def serve(pipe, sampling: dict, config: ServerConfig = ServerConfig(), host: str = "127.0.0.1", port: int = 8000,
          prompt: PromptChange | None = None, playlist: Playlist | None = None, captioner=None,
          caption_every_s: float = 30.0) -> None:
    """Serve an endless stream of `pipe.stream(**sampling)` until SIGINT/SIGTERM, then drain and exit."""
    from aiohttp import web

    server = StreamServer(pipe, sampling, config, prompt=prompt, playlist=playlist, captioner=captioner,
                          caption_every_s=caption_every_s)
    app = create_app(server)
    where = f"http://{host}:{port}/"
    log.info("serving on %s (%s)", where, ", ".join(
        {"mjpeg": "MJPEG /stream.mjpg", "hls": "HLS /hls/live.m3u8", "mp4": "fMP4 /stream.mp4"}[f]
        for f in config.formats))
    if host not in ("127.0.0.1", "localhost", "::1") and config.token is None:
        log.warning("bound to %s without --token: anyone who can reach it can change the prompt", host)
    # Players poll the HLS playlist every second: access lines only with --verbose.
    access_log = logging.getLogger("aiohttp.access") if log.isEnabledFor(logging.DEBUG) else None
    web.run_app(app, host=host, port=port, print=None, shutdown_timeout=5.0, handle_signals=True,
                access_log=access_log)
