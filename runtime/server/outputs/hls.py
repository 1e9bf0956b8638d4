"""H.264 HLS: 1 s fMP4 segments and a rolling playlist, answered from memory (hls_window.py)."""
from __future__ import annotations

import re

from .base import FLEET_VIDEO, Encoding, Output, Serving
from ..encoders import HlsEncoder

HLS_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\.(m3u8|m4s|mp4)$")


def make_encoders(encoding: Encoding) -> list:
    server = encoding.server
    encoder = HlsEncoder(server.hls_folder, encoding.fps, encoding.width, encoding.height,
                         list_size=server.config.hls_list_size, leader=encoding.h264, window=server.hls_window,
                         restarted=server.restarted)
    encoding.h264 = encoding.h264 or encoder
    return [encoder]


def add_routes(app, serving: Serving) -> None:
    from aiohttp import web

    async def hls_file(request):
        name = request.match_info["name"]
        if not HLS_NAME.match(name):
            return serving.error(400, "invalid HLS file name: expected live.m3u8 or a segment name it lists")
        file = serving.server.hls_window.get(name)
        if file is None:
            return serving.error(404, f"{name} is not there (yet, or it rolled out of the window); reload the playlist")
        return web.Response(body=file.body, content_type=file.content_type,
                            headers={"Cache-Control": file.cache_control})

    app.router.add_get("/hls/{name}", hls_file)


def status(server) -> dict:
    return {"hls_requests": server.hls_window.requests.snapshot()}


def prometheus(server) -> str:
    return server.hls_window.requests.prometheus()


# The playlist is answered here (by the ingress, forwarded): only segments and the init segment
# are video bytes that go to the node.
OUTPUT = Output(name="hls", title="HLS", paths=("hls/live.m3u8",), content_type="application/vnd.apple.mpegurl",
                fleet=FLEET_VIDEO, fleet_paths=r"/hls/[A-Za-z0-9_-]{1,64}\.(?:m4s|mp4)", h264=True,
                make_encoders=make_encoders, add_routes=add_routes, status=status, prometheus=prometheus)
