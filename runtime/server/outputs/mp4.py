"""H.264 in fragmented MP4, a fragment per frame, on one endless HTTP answer (mpv, VLC, ffplay)."""
from __future__ import annotations

from .base import FLEET_VIDEO, Encoding, Output, Serving
from ..encoders import Fmp4Encoder


def make_encoders(encoding: Encoding) -> list:
    encoder = Fmp4Encoder(encoding.server.broadcasts["mp4"], encoding.fps, encoding.width, encoding.height,
                          leader=encoding.h264)
    encoding.h264 = encoding.h264 or encoder
    return [encoder]


def add_routes(app, serving: Serving) -> None:
    async def mp4(request):
        return await serving.stream_out(request, "mp4", "video/mp4", b"".join)

    app.router.add_get("/stream.mp4", mp4)


OUTPUT = Output(name="mp4", title="fMP4", paths=("stream.mp4",), content_type="video/mp4", fleet=FLEET_VIDEO,
                fleet_paths=r"/stream\.mp4", h264=True, broadcast="keyframes", make_encoders=make_encoders,
                add_routes=add_routes)
