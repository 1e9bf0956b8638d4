"""The output registry: every way `skyrt serve` sends the stream out, one module each.

    mjpeg.py   MJPEG                  GET /stream.mjpg        (--formats mjpeg)
    mp4.py     H.264 fragmented MP4   GET /stream.mp4         (--formats mp4)
    hls.py     H.264 HLS              GET /hls/live.m3u8      (--formats hls)
    llhls.py   low-latency HLS        GET /llhls/live.m3u8    (beside hls unless --ll-hls-part 0)
    webrtc.py  WebRTC (WHEP)          POST /whep, DELETE /whep/{id}   (--formats webrtc)
    rtmp.py    RTMP push              --publish rtmp://HOST/APP/KEY (no route: the server connects out)

The server (stream_server.py: which encoders run, in what order; app.py: which routes exist), the
CLI's `--formats`, `/status`, `/metrics`, the player page (it reads `/status`'s `outputs`) and the
fleet ingress (runtime/fleet/ingress.py: which paths it redirects, proxies or forwards) all take the
list from `OUTPUTS` here. Adding a format is one module that defines an `Output`, its line in
`OUTPUTS`, and its tests.
"""
from __future__ import annotations

import re

from .base import FLEET_FORWARD, FLEET_NONE, FLEET_VIDEO, Encoding, Output, Serving
from . import hls, llhls, mjpeg, mp4, rtmp, webrtc

__all__ = ["BY_NAME", "DEFAULT_FORMATS", "FLEET_FORWARD", "FLEET_NONE", "FLEET_VIDEO", "FORMATS", "H264_FORMATS",
           "OUTPUTS", "Encoding", "Output", "Serving", "active", "fleet_pattern"]

# Order matters: the pacer runs encoders in this order, so H.264 leaders come before followers
# (mp4 leads when on, else hls, else webrtc; llhls, webrtc and rtmp can follow).
OUTPUTS: tuple[Output, ...] = (mjpeg.OUTPUT, mp4.OUTPUT, hls.OUTPUT, llhls.OUTPUT, webrtc.OUTPUT, rtmp.OUTPUT)
BY_NAME = {output.name: output for output in OUTPUTS}
FORMATS = tuple(o.name for o in OUTPUTS if o.selectable)  # every name --formats takes
DEFAULT_FORMATS = tuple(o.name for o in OUTPUTS if o.selectable and o.default)
H264_FORMATS = tuple(o.name for o in OUTPUTS if o.selectable and o.h264)


def active(config) -> list[Output]:
    """The outputs a server with `config` runs, in registry order."""
    return [output for output in OUTPUTS if output.is_on(config)]


def fleet_pattern(kind: str) -> re.Pattern:
    """One regex of every output's paths the fleet ingress routes as `kind` (FLEET_VIDEO, FLEET_FORWARD)."""
    parts = [o.fleet_paths for o in OUTPUTS if o.fleet == kind and o.fleet_paths]
    return re.compile("^(" + "|".join(f"(?:{p})" for p in parts) + ")$")
