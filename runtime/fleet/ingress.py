"""The fleet's HTTP front door: a Ray Serve deployment in front of every stream.

    GET  /streams                        every stream: state, node, GPUs, fps, clients, restarts
    GET  /metrics                        every stream's metrics with a `stream` label, plus fleet figures
    GET  /healthz                        200 while every stream runs, else 503 (with the count)
    *    /streams/{id}/...               the endpoints of `skyrt serve` for that stream: the page, MJPEG,
                                         fMP4, HLS, POST /prompt, GET/PUT /playlist, /status, /metrics, ...

Video bytes (MJPEG, fMP4 and HLS segments) do not pass through here by default: the client gets a
307 to the node that owns the stream and reads them there (`video: redirect`). Everything else
(page, HLS playlist, control, status) is answered here, control and status by forwarding the request
to the stream's own server, whose checks (token, Origin, Host, content type, JSON depth, body size)
are the same as `skyrt serve`'s because it is the same server. A client keeps one URL for good: after
a restart on another node the next request finds the stream where it now runs. `video: proxy`
copies the video bytes through the ingress instead (one reachable address, a central hop per frame;
benchmarks/fleet.py measures the cost of each).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..server.outputs import FLEET_VIDEO, fleet_pattern
from ..server.outputs.hls import HLS_NAME
from .config import NAMESPACE, STREAM_ID
from .prometheus import gauge, merge_with_label

log = logging.getLogger("skyrt.fleet")

STATIC = Path(__file__).resolve().parent.parent / "server" / "static"
MAX_BODY_BYTES = 64 * 1024  # the stream's server refuses more anyway; the ingress stops reading here
ADDRESS_TTL_S = 1.0  # a stream's address is asked again after this long (it moves when restarted)
ADDRESS_WAIT_S = 2.0
FORWARD_TIMEOUT_S = 10.0
RETRY_AFTER_S = "2"
# Every output says how its paths are routed (runtime/server/outputs/): video bytes are redirected
# (or proxied), the rest (HLS playlists, LL-HLS, WHEP signalling) is forwarded to the stream's server.
VIDEO_PATHS = fleet_pattern(FLEET_VIDEO)
ENDLESS_PATHS = ("/stream.mjpg", "/stream.mp4")  # answers that never end: copied as they come
FORWARDED_REQUEST_HEADERS = ("host", "origin", "authorization", "content-type", "accept", "user-agent")
# location: a WHEP session's resource URL (relative, so it stays under /streams/{id}/)
FORWARDED_RESPONSE_HEADERS = ("content-type", "cache-control", "retry-after", "allow", "location")


@dataclass(frozen=True)
class Route:
    """What a request asks for: `kind` is one of list, metrics, healthz, root, slash, page, asset,
    video, forward, method (not allowed) or missing; `rest` is the path under /streams/{id}."""

    kind: str
    stream: str | None = None
    rest: str = ""


def route(method: str, path: str) -> Route:
    """Classify a request by its method and path (no I/O: the ingress's whole URL space is here)."""
    read = method in ("GET", "HEAD")
    fleet_paths = {"/": "root", "/streams": "list", "/streams/": "list", "/metrics": "metrics", "/healthz": "healthz"}
    if path in fleet_paths:
        return Route(fleet_paths[path] if read else "method")
    if not path.startswith("/streams/"):
        return Route("missing")
    stream, _, rest = path[len("/streams/"):].partition("/")
    if not STREAM_ID.match(stream):
        return Route("missing")
    rest = "/" + rest
    if path == f"/streams/{stream}":
        return Route("slash" if read else "method", stream)
    if rest == "/":
        return Route("page" if read else "method", stream, rest)
    if rest == "/static/hls.light.min.js":
        return Route("asset" if read else "method", stream, rest)
    if VIDEO_PATHS.match(rest):
        return Route("video" if read else "method", stream, rest)
    return Route("forward", stream, rest)  # the stream's server answers (and refuses what it must)


def node_url(address, rest: str, query: str = "") -> str:
    host, port = address[0], address[1]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}{rest}" + (f"?{query}" if query else "")


def _json(status: int, data, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(data), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-cache, no-store", **(headers or {})})


class FleetIngress:
    """The ingress deployment's class (wrapped by `serve.deployment` in `ingress_deployment`)."""

    def __init__(self, fleet: str, video: str = "redirect"):
        import ray

        from .actors import controller_name

        self.fleet, self.video = fleet, video
        self.controller = ray.get_actor(controller_name(fleet), namespace=NAMESPACE)
        self._session = None
        self._handles: dict[str, object] = {}
        self._addresses: dict[str, tuple[float, list | None]] = {}
        self._probes: dict[str, asyncio.Future] = {}

    async def __call__(self, request):
        target = route(request.method, request.url.path)
        try:
            return await self._answer(target, request)
        except Exception:
            log.exception("ingress failed on %s %s", request.method, request.url.path)
            return _json(500, {"error": "internal error in the fleet ingress (logged)"})

    async def _answer(self, target: Route, request):
        from starlette.responses import FileResponse, RedirectResponse

        kind = target.kind
        if kind == "missing":
            return _json(404, {"error": f"no such path {request.url.path}; streams are listed at /streams and "
                                        f"served under /streams/<id>/"})
        if kind == "method":
            return _json(405, {"error": f"{request.method} is not allowed on {request.url.path}"})
        if kind == "root":
            return RedirectResponse("/streams", status_code=307)
        if kind == "list":
            return _json(200, {"fleet": self.fleet, "video": self.video, "streams": await self.controller.status.remote()})
        if kind == "healthz":
            return await self._healthz()
        if kind == "metrics":
            from starlette.responses import PlainTextResponse

            return PlainTextResponse(await self._metrics())
        if not await self._known(target.stream):
            return self._no_such_stream(target.stream)
        if kind == "slash":
            return RedirectResponse(f"/streams/{target.stream}/", status_code=307)
        if kind == "page":
            return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache, no-store"})
        if kind == "asset":
            return FileResponse(STATIC / "hls.light.min.js", media_type="application/javascript")
        if kind == "video" and target.rest.startswith("/hls/") and not HLS_NAME.match(target.rest[5:]):
            return _json(400, {"error": "invalid HLS file name: expected live.m3u8 or a segment name it lists"})
        address = await self._address(target.stream)
        if address is None and not await self._known(target.stream):  # removed while its address was asked
            return self._no_such_stream(target.stream)
        if address is None:
            return _json(503, {"error": f"stream {target.stream!r} is not serving right now (loading, restarting or "
                                        f"waiting for a node); retry in a few seconds"},
                         headers={"Retry-After": RETRY_AFTER_S})
        url = node_url(address, target.rest, request.url.query)
        if kind == "video":
            if self.video == "redirect":
                return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-cache, no-store"})
            return await self._proxy_video(target.stream, url, endless=target.rest in ENDLESS_PATHS)
        return await self._forward(target.stream, url, request)

    def _no_such_stream(self, stream_id: str):
        return _json(404, {"error": f"no stream {stream_id!r} in fleet {self.fleet!r}; see /streams"})

    # ------------------------------------------------------------------------------- streams
    def _handle(self, stream_id: str):
        import ray

        from .actors import stream_actor_name

        handle = self._handles.get(stream_id)
        if handle is None:
            try:
                handle = ray.get_actor(stream_actor_name(self.fleet, stream_id), namespace=NAMESPACE)
            except ValueError:
                return None
            self._handles[stream_id] = handle
        return handle

    async def _known(self, stream_id: str) -> bool:
        return self._handle(stream_id) is not None

    async def _address(self, stream_id: str, retry: bool = True) -> list | None:
        """The stream's [host, port] from the actor itself (so never a stale one for long), cached
        ADDRESS_TTL_S; None while it loads, restarts or waits for a node."""
        import ray

        cached = self._addresses.get(stream_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < ADDRESS_TTL_S:
            return cached[1]
        handle = self._handle(stream_id)
        if handle is None:
            return None
        future = self._probes.get(stream_id)
        if future is None or future.done():
            future = self._probes[stream_id] = asyncio.wrap_future(handle.address.remote().future())
        try:
            address = await asyncio.wait_for(asyncio.shield(future), ADDRESS_WAIT_S)
        except asyncio.TimeoutError:
            address = None
        except ray.exceptions.RayError:  # removed, or ended for good: look it up by name again
            self._handles.pop(stream_id, None)
            if retry:  # a stream removed and added again under its id is a new actor of that name
                return await self._address(stream_id, retry=False)
            address = None
        self._addresses[stream_id] = (now, address)
        return address

    def _forget(self, stream_id: str) -> None:
        self._addresses.pop(stream_id, None)

    def _client(self):
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(auto_decompress=False,
                                                  timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S, sock_connect=3))
        return self._session

    async def _forward(self, stream_id: str, url: str, request):
        """The request, as the client made it (method, body, the headers the stream's checks read),
        answered by the stream's own server."""
        import aiohttp
        from starlette.responses import Response

        body = b""
        if request.method not in ("GET", "HEAD"):
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                return _json(413, {"error": f"body larger than {MAX_BODY_BYTES} bytes"})
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    return _json(413, {"error": f"body larger than {MAX_BODY_BYTES} bytes"})
                chunks.append(chunk)
            body = b"".join(chunks)
        headers = {name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers}
        try:
            async with self._client().request(request.method, url, data=body or None, headers=headers,
                                              allow_redirects=False) as answer:
                content = await answer.read()
                kept = {k: v for k, v in answer.headers.items() if k.lower() in FORWARDED_RESPONSE_HEADERS}
                return Response(content, status_code=answer.status, headers=kept)
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            self._forget(stream_id)
            return _json(503, {"error": f"stream {stream_id!r} did not answer ({type(err).__name__}); it may be "
                                        f"restarting: retry in a few seconds"}, headers={"Retry-After": RETRY_AFTER_S})

    async def _proxy_video(self, stream_id: str, url: str, endless: bool):
        """video: proxy — copy the stream's bytes to the client as they come (an HLS segment whole)."""
        import aiohttp
        from starlette.responses import Response, StreamingResponse

        try:
            answer = await self._client().get(url, timeout=aiohttp.ClientTimeout(total=None, sock_connect=3))
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            self._forget(stream_id)
            return _json(503, {"error": f"stream {stream_id!r} did not answer ({type(err).__name__}); retry"},
                         headers={"Retry-After": RETRY_AFTER_S})
        kept = {k: v for k, v in answer.headers.items() if k.lower() in FORWARDED_RESPONSE_HEADERS}
        if answer.status != 200 or not endless:
            content = await answer.read()
            answer.release()
            return Response(content, status_code=answer.status, headers=kept)

        async def copy():
            try:
                async for chunk in answer.content.iter_any():
                    yield chunk
            finally:
                answer.release()

        return StreamingResponse(copy(), status_code=200, headers=kept)

    # ------------------------------------------------------------------------------ fleet-wide
    async def _healthz(self):
        streams = await self.controller.status.remote()
        running = sum(1 for s in streams if s["state"] == "running")
        return _json(200 if running == len(streams) else 503, {"ok": running == len(streams), "running": running,
                                                              "streams": len(streams)})

    async def _metrics(self) -> str:
        """Every running stream's /metrics (fetched concurrently, 2 s each at most) with a stream label,
        then the fleet's own figures."""
        import aiohttp

        streams = await self.controller.status.remote()

        async def fetch(entry):
            address = entry.get("address")
            if entry["state"] != "running" or not address:
                return entry["id"], ""
            try:
                async with self._client().get(node_url(address, "/metrics"),
                                              timeout=aiohttp.ClientTimeout(total=2)) as answer:
                    return entry["id"], await answer.text() if answer.status == 200 else ""
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return entry["id"], ""

        texts = dict(await asyncio.gather(*(fetch(entry) for entry in streams)))
        fleet = [
            gauge("skyrt_fleet_stream_up", "1 while the stream serves, 0 while it loads, restarts or is pending.",
                  [({"stream": s["id"]}, float(s["state"] == "running")) for s in streams]),
            gauge("skyrt_fleet_stream_restarts_total", "Times Ray restarted the stream's actor since it was created.",
                  [({"stream": s["id"]}, float(s["restarts"])) for s in streams], kind="counter"),
            gauge("skyrt_fleet_streams", "Streams in the fleet by state.",
                  [({"state": state}, float(sum(1 for s in streams if s["state"] == state)))
                   for state in sorted({s["state"] for s in streams})]),
        ]
        return merge_with_label(texts) + "".join(fleet)


def ingress_deployment(fleet: str, video: str):
    """The Serve application of a fleet's ingress: one replica on the head node (it holds no state;
    Serve restarts it), no CPU reserved, effectively no cap on requests in flight (a proxied video
    client holds one for as long as it watches)."""
    from ray import serve

    from .actors import HEAD_NODE_RESOURCE

    deployment = serve.deployment(FleetIngress, name="ingress", num_replicas=1, max_ongoing_requests=100_000,
                                  ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}})
    return deployment.bind(fleet, video)
