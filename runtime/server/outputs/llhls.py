"""Low-latency HLS beside HLS (/llhls/, parts of `--ll-hls-part` seconds, blocking reload): an fMP4
follower of the H.264 encode (runtime/server/llhls.py). On with hls unless the part length is 0."""
from __future__ import annotations

from .base import FLEET_FORWARD, Encoding, Output, Serving
from .. import llhls


def make_encoders(encoding: Encoding) -> list:
    return [llhls.LlHlsPackager(encoding.server.llhls_window, encoding.fps, encoding.width, encoding.height,
                                leader=encoding.h264)]


def add_routes(app, serving: Serving) -> None:
    llhls.add_routes(app, serving.server.llhls_window)


# Parts are made a fraction of a second before they are asked for (a preload hint is waited on):
# the ingress forwards them to the stream's server rather than redirecting each one.
OUTPUT = Output(name="llhls", title="LL-HLS", paths=("llhls/live.m3u8",),
                content_type=llhls.CONTENT_TYPES["m3u8"], fleet=FLEET_FORWARD, fleet_paths=r"/llhls/.*",
                selectable=False, h264=True, enabled=lambda config: "hls" in config.formats and bool(config.ll_hls_part_s),
                make_encoders=make_encoders, add_routes=add_routes)
