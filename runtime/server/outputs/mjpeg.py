"""MJPEG (multipart/x-mixed-replace): a JPEG per new frame, for an <img> tag, kiosks and OpenCV."""
from __future__ import annotations

from .base import FLEET_VIDEO, Encoding, Output, Serving
from ..encoders import MJPEG_BOUNDARY, MjpegEncoder

CONTENT_TYPE = f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}"


def make_encoders(encoding: Encoding) -> list:
    server = encoding.server
    return [MjpegEncoder(server.broadcasts["mjpeg"], server.config.jpeg_quality)]


def add_routes(app, serving: Serving) -> None:
    async def mjpeg(request):
        # Items are whole multipart parts (encoders.py); a client shows each part as it arrives, so
        # only the newest of a batch is worth sending.
        return await serving.stream_out(request, "mjpeg", CONTENT_TYPE, lambda batch: batch[-1])

    app.router.add_get("/stream.mjpg", mjpeg)


OUTPUT = Output(name="mjpeg", title="MJPEG", paths=("stream.mjpg",), content_type=CONTENT_TYPE,
                fleet=FLEET_VIDEO, fleet_paths=r"/stream\.mjpg", broadcast="frames",
                make_encoders=make_encoders, add_routes=add_routes)
