"""What an output is (the registry in outputs/__init__.py lists them): the Output record, and what an
output's encoder factory and route adder are given."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..encoders import _H264Output

# How the fleet ingress routes an output's paths (runtime/fleet/ingress.py):
FLEET_VIDEO = "video"  # video bytes: a 307 to the node that owns the stream (or copied through, `video: proxy`)
FLEET_FORWARD = "forward"  # answered by the stream's own server through the ingress (signalling, playlists)
FLEET_NONE = "none"  # no route (RTMP push: the server connects out)


@dataclass
class Encoding:
    """What an output's `make_encoders` gets: the stream's size and rate, the server, and the H.264
    leader so far (the first H.264 output encodes; later ones follow it: one libx264 per frame)."""

    server: object
    fps: int
    width: int
    height: int
    h264: _H264Output | None = None


@dataclass
class Serving:
    """What an output's `add_routes` gets from app.py: the server, its config, the JSON error answer,
    and the stream copier for Broadcast outputs (`stream_out(request, name, content_type, pack)`)."""

    server: object
    error: Callable
    stream_out: Callable
    read_body: Callable  # read_body(request) -> bytes, bounded by config.max_body_bytes (413 past it)
    shutdown_hooks: list = field(default_factory=list)  # async callables run at shutdown


@dataclass(frozen=True)
class Output:
    """One output: what it is called, how it is turned on, what it encodes, what it serves."""

    name: str  # the --formats name, the `format` label in /metrics, the key in /status
    title: str  # for people: the start log line, the page
    paths: tuple[str, ...]  # where a viewer starts (relative to the stream's root)
    content_type: str  # of what `paths` answer
    fleet: str  # FLEET_VIDEO | FLEET_FORWARD | FLEET_NONE
    fleet_paths: str | None = None  # regex of the paths under the stream's root routed as `fleet`
    selectable: bool = True  # named in --formats (False: turned on by another setting, `enabled`)
    default: bool = True  # in the default --formats
    h264: bool = False  # carries the one H.264 encode (it may lead it, or follow it)
    broadcast: str | None = None  # "frames" | "keyframes": the server makes a Broadcast of that kind
    enabled: Callable[[object], bool] | None = None  # for a non-selectable output
    make_encoders: Callable[[Encoding], list] = lambda encoding: []
    add_routes: Callable[[object, Serving], None] | None = None
    status: Callable[[object], dict] | None = None  # keys merged into /status
    prometheus: Callable[[object], str] | None = None  # text appended to /metrics

    def is_on(self, config: object) -> bool:
        if self.selectable:
            return self.name in config.formats
        return bool(self.enabled and self.enabled(config))

    def describe(self) -> dict:
        """The output as /status lists it (the page picks its players from this)."""
        return {"name": self.name, "title": self.title, "paths": list(self.paths), "content_type": self.content_type}


