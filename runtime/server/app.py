"""The HTTP side of `skyrt serve` (aiohttp): handlers parse, authorize and copy bytes; they never
touch the pipeline. Control input becomes typed objects at the edge (playlist.py) or a 4xx JSON
error that names the problem.

    GET  /                 player page (hls.js vendored, works offline), prompt box, live figures
    GET  /stream.mjpg      MJPEG (multipart/x-mixed-replace)
    GET  /stream.mp4       H.264 fragmented MP4, a fragment per frame (mpv, VLC, ffplay)
    GET  /hls/live.m3u8    H.264 HLS, 1 s fMP4 segments, rolling playlist with program-date-time
    GET  /llhls/live.m3u8  the same as low-latency HLS: 0.25 s parts, blocking reload (llhls.py)
    POST /whep             WebRTC: an SDP offer -> 201 + answer + Location;  DELETE /whep/{id} ends it
    POST /prompt           {"prompt", "negative_prompt"?, "transition"?: "continue"|"recache"}   [token]
    GET  /playlist         the playlist and its position;  PUT /playlist replaces it              [token]
    GET  /schedule         the wall-clock schedule, its entry showing and the next;  PUT replaces it [token]
    GET  /settings         generation settings, each with its layer;  PUT/POST /settings sets them [token]
    GET  /status           JSON figures;  GET /metrics  Prometheus text;  GET /healthz  liveness
    GET  /caption          the latest caption of the live stream (with --caption-every)
The video routes are the outputs' own (outputs/: one module per output); this module adds the
routes every server has, and the copier the Broadcast outputs write their clients with.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path

try:  # a deadline on a stalled client's wait: a timer handle, no extra task
    from asyncio import timeout as within  # Python 3.11+
except ImportError:  # Python 3.10: aiohttp's own dependency
    from async_timeout import timeout as within

from .connections import admission
from .guard import (MAX_JSON_DEPTH, Refusal, check_content_type, check_host, check_origin, json_depth_exceeds,
                    token_matches)
from .memtrace import add_debug_routes
from .outputs import Serving
from .playlist import RequestError, parse_playlist, parse_prompt_change
from .schedule import add_schedule_routes
from .settings_control import add_settings_routes
from .write_watch import WriteWatch

log = logging.getLogger("skyrt.server")

STATIC = Path(__file__).parent / "static"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
STREAM_TICK_S = 0.25  # a stream client looks at its socket at least this often


def _error(status: int, message: str):
    from aiohttp import web

    return web.json_response({"error": message}, status=status)


_UNAUTHORIZED = Refusal(401, "unauthorized: send the header 'Authorization: Bearer <token>' with the server's "
                             "token (printed at start, or the one given with --token-file / SKYRT_TOKEN)")


def create_app(server):
    """The aiohttp application of a `StreamServer` (see server.py)."""
    from aiohttp import web

    config = server.config
    allowed_hosts = frozenset(name.lower().rstrip(".") for name in config.allowed_hosts)
    streams: set = set()  # transports of the stream responses in flight (aborted at shutdown)
    writes = WriteWatch(config.write_timeout_s)  # the stream clients' write deadlines, on one timer

    def authorized(request) -> bool:
        return config.token is None or token_matches(request.raw_headers, config.token)

    def refusal(request):
        """Why a control request is refused before its body is read (see guard.py), or None."""
        host = request.headers.get("Host")
        return (check_host(host, allowed_hosts) or check_origin(request.headers.get("Origin"), host, allowed_hosts)
                or (None if authorized(request) else _UNAUTHORIZED)
                or check_content_type(request.content_type))

    async def read_body(request) -> bytes:
        """The request body, bounded by config.max_body_bytes (HTTPRequestEntityTooLarge past it)."""
        if request.content_length is not None and request.content_length > config.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=config.max_body_bytes, actual_size=request.content_length)
        body = await request.content.read(config.max_body_bytes + 1)
        if len(body) > config.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=config.max_body_bytes, actual_size=len(body))
        return body

    async def read_json(request):
        """The request body as JSON, bounded by config.max_body_bytes."""
        body = await read_body(request)
        if json_depth_exceeds(body):
            raise RequestError(f"body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels; a prompt or a "
                               f"playlist needs 3, send e.g. {{\"prompt\": \"a red fox\"}}")
        try:
            return json.loads(body)
        except RecursionError as err:  # unreachable after the depth check; kept so no input can 500
            raise RequestError(f"body nests too deeply to parse; keep it under {MAX_JSON_DEPTH} levels") from err
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(f"body is not valid JSON ({err}); send e.g. {{\"prompt\": \"a red fox\"}}") from err

    def control(handler):
        """Token check, bounded JSON parsing, and 4xx JSON errors for a control endpoint."""
        async def wrapped(request):
            refused = refusal(request)
            if refused is not None:
                with server.metrics.lock:
                    server.metrics.control_refused += 1
                return _error(refused.status, refused.message)
            try:
                response = await handler(request, await read_json(request))
                await asyncio.to_thread(server.save_state)  # a 200 means the change is on disk
                return response
            except RequestError as err:
                return _error(400, str(err))
            except web.HTTPRequestEntityTooLarge:
                return _error(413, f"body larger than {config.max_body_bytes} bytes")
        return wrapped

    # The page and its player, read once: answered from memory like the HLS files (a FileResponse
    # writes itself in prepare() and cannot be prepared twice, which write_deadline below needs).
    page, player = (STATIC / "index.html").read_bytes(), (STATIC / "hls.light.min.js").read_bytes()

    async def index(_request):
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers=NO_CACHE)

    async def hls_js(_request):
        return web.Response(body=player, content_type="application/javascript", charset="utf-8")

    async def healthz(_request):
        health = server.health()
        return web.json_response(health, status=200 if health["ok"] else 503)

    async def status(_request):
        return web.json_response(server.status(), headers=NO_CACHE)

    async def metrics(_request):
        return web.Response(text=server.metrics.prometheus(), content_type="text/plain",
                            charset="utf-8", headers={"X-Format": "prometheus-0.0.4"})

    async def prompt(request, body):
        change = parse_prompt_change(body, server.limits)
        server.board.set_prompt(change)
        return web.json_response({"ok": True, "prompt": change.prompt, "transition": change.transition})

    async def get_playlist(_request):
        return web.json_response(server.board.playlist_json())

    async def put_playlist(request, body):
        playlist = parse_playlist(body, server.limits)
        server.board.set_playlist(playlist)
        return web.json_response(dict(server.board.playlist_json(), ok=True))

    async def caption(_request):
        if server.captioner is None:
            return _error(404, "live captioning is off; start the server with --caption-every SECONDS")
        return web.json_response(server.captioner.latest(), headers=NO_CACHE)

    async def stream_out(request, fmt: str, content_type: str, pack):
        """Copy a Broadcast to one client until it leaves; a stalled socket cuts the client off.

        Written through aiohttp's response, one write per wake-up with everything new (`pack` makes
        the batch one write). While the socket holds bytes of the last write, nothing is taken from
        the ring (the ring drops the oldest meanwhile); if it holds them `write_timeout_s`, the client
        is cut off. A write that aiohttp holds waiting for the socket is cut off by `writes` (one
        timer for every client, not a timeout context per frame: see write_watch.py)."""
        broadcast = server.broadcasts.get(fmt)
        if broadcast is None:
            return _error(404, f"{fmt} output is off; add {fmt} to --formats")  # unreachable: routes follow outputs
        response = web.StreamResponse(headers=dict(NO_CACHE, **{"Content-Type": content_type}))
        transport = request.transport
        reader = broadcast.subscribe()
        server.metrics.client_connected(fmt, reader, None if transport is None else transport.get_write_buffer_size)
        streams.add(transport)
        loop = asyncio.get_running_loop()
        stalled = False
        try:
            await response.prepare(request)  # sends the headers
            if transport is None or transport.is_closing():
                raise ConnectionResetError("client went away before its stream started")
            bound_send_buffers(transport)
            async with within(config.write_timeout_s):
                if broadcast.header:
                    await response.write(broadcast.header)
            unsent_since = None  # when the socket was first seen holding bytes it had not taken
            while not broadcast.closed:
                await reader.wait(STREAM_TICK_S)
                if transport.is_closing():
                    raise ConnectionResetError("client went away")
                if transport.get_write_buffer_size():
                    unsent_since = unsent_since or loop.time()
                    if loop.time() - unsent_since >= config.write_timeout_s:
                        raise asyncio.TimeoutError
                    await asyncio.sleep(STREAM_TICK_S)  # wait() returns at once while items wait
                    continue
                unsent_since = None
                batch = reader.take()
                if batch:
                    writes.begin(reader.id, transport)
                    try:
                        await response.write(pack(batch))
                    finally:
                        writes.end(reader.id)
        except asyncio.TimeoutError:
            stalled = True
        except ConnectionError:
            if not writes.expired(reader.id):
                client_gone(request)
            else:
                stalled = True
        except asyncio.CancelledError:
            pass  # the server is stopping
        finally:
            writes.expired(reader.id)  # forgotten whatever the way out
            streams.discard(transport)
            server.metrics.client_disconnected(fmt, reader)
        if stalled:
            # Abort, not close: close() would wait to flush the very send queue that stalled, and keep
            # the socket and its kernel buffers until then.
            if transport is not None:
                transport.abort()
            with server.metrics.lock:
                server.metrics.client_write_timeouts += 1
            log.info("%s client %d stalled for %.0f s; disconnected", fmt, reader.id, config.write_timeout_s)
        return response

    def bound_send_buffers(transport) -> None:
        """A stream socket's backlog lives in its drop-oldest ring, not in buffers: a fixed kernel
        send buffer (Linux would grow it to 4 MiB) and no user-space buffer past the write in hand
        (the transport pauses as soon as the kernel leaves bytes unsent)."""
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.stream_send_buffer_bytes)
        transport.set_write_buffer_limits(high=0)

    def client_gone(request) -> None:
        """A viewer going away is normal: counted, logged at debug level only."""
        with server.metrics.lock:
            server.metrics.clients_gone += 1
        log.debug("client %s went away during %s %s", request.remote, request.method, request.path)

    @web.middleware
    async def write_deadline(request, handler):
        """Every answer is written whole within `config.write_timeout_s`, or its connection is dropped.

        aiohttp waits for a socket that takes no more bytes for as long as it takes; a client that
        pipelines requests and never reads would hold its connection (and its file descriptor) for
        good. So the answer is written here, under the clock, rather than after the handler returns
        (aiohttp then finds it written). Streams end inside their handler, under their own stall clock."""
        response = await handler(request)
        transport = request.transport
        if transport is None or transport.is_closing():
            return response  # the client left, or a stream's stall clock cut it off
        try:
            async with within(config.write_timeout_s):
                await response.prepare(request)
                await response.write_eof()
        except asyncio.TimeoutError:
            transport.abort()  # not close(): that would wait to flush the very bytes that stalled
            with server.metrics.lock:
                server.metrics.client_write_timeouts += 1
            log.debug("answer to %s %s not taken within %.0f s; connection dropped", request.method,
                      request.path, config.write_timeout_s)
        except ConnectionError:
            client_gone(request)
        return response

    @web.middleware
    async def json_errors(request, handler):
        """Unknown paths and wrong methods answer JSON too, and no handler error reaches the client raw."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, f"{exc.reason}: {request.method} {request.path}")
        except ConnectionError:  # the client left before its answer: nobody to answer
            client_gone(request)
            response = web.Response(status=204)
            response.force_close()
            return response
        except Exception:
            log.exception("handler failed on %s %s", request.method, request.path)
            return _error(500, "internal error (logged on the server)")

    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[admission(server.connections), write_deadline, json_errors])
    app.router.add_get("/", index)
    app.router.add_get("/static/hls.light.min.js", hls_js)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/prompt", control(prompt))
    app.router.add_get("/playlist", get_playlist)
    app.router.add_put("/playlist", control(put_playlist))
    app.router.add_get("/caption", caption)
    add_schedule_routes(app, server, control)  # schedule.py: wall-clock entries
    add_settings_routes(app, server, control, _error)  # settings_control.py: the HTTP control layer
    serving = Serving(server, _error, stream_out, read_body)
    for output in server.outputs:  # outputs/: each output's own routes (a format that is off has none)
        if output.add_routes is not None:
            output.add_routes(app, serving)
    add_off_routes(app, server)
    add_debug_routes(app, server, authorized, _error)  # GET /debug/memory: only with $SKYRT_TRACEMALLOC, token only

    async def start(_app):
        server.start(asyncio.get_running_loop())

    async def stop(_app):
        # Streams never end by themselves, and a stalled one would hold shutdown until its write
        # times out: cut every stream client off at once, then drain the threads.
        for transport in list(streams):
            transport.abort()
        writes.close()
        for hook in serving.shutdown_hooks:  # e.g. WebRTC sessions: closed while the loop runs
            await hook()
        await asyncio.to_thread(server.stop)

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app


def add_off_routes(app, server) -> None:
    """An output that is off answers its entry paths 404 with how to turn it on (not a bare 404)."""
    from .outputs import OUTPUTS

    on = {output.name for output in server.outputs}
    for output in OUTPUTS:
        if output.name in on or not output.selectable:
            continue
        for path in output.paths:
            message = f"{output.title} output is off; add {output.name} to --formats"

            async def off(_request, message=message):
                return _error(404, message)

            route = "/" + path.split("/")[0] + ("/{name}" if "/" in path else "")
            app.router.add_route("*", route, off)
