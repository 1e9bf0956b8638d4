"""The connection layer's fast path (connections.py) on a real aiohttp server with real sockets.

The app answers GET /file with the body "slow"; the fast path, when it answers, says "fast". So each
test sees which path answered, and that requests the fast path must not take (pipelined, split,
ranged, closing, with a body, after a body) reach aiohttp intact and in order."""
from __future__ import annotations

import asyncio
import re

import pytest

from skyrt.runtime.server.connections import ConnectionLimits, ConnectionRegistry, fast_request_path, guarded_runner

FAST = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nfast"


def _fast_answer(path: bytes) -> bytes | None:
    return FAST if path == b"/file" else None


def _app():
    from aiohttp import web

    async def slow_file(_request):
        return web.Response(text="slow")

    async def echo(request):
        return web.Response(text=f"echo {len(await request.read())}")

    app = web.Application()
    app.router.add_get("/file", slow_file)
    app.router.add_post("/echo", echo)
    return app


async def _serve(scenario, keepalive_s: float = 15.0):
    """Run `scenario(port, registry)` against a guarded server on a free loopback port."""
    from aiohttp import web

    registry = ConnectionRegistry(ConnectionLimits(keepalive_timeout_s=keepalive_s))
    runner = guarded_runner(_app(), registry, fast_answer=_fast_answer)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await scenario(port, registry)
    finally:
        await runner.cleanup()


async def _read_answer(reader) -> bytes:
    """One HTTP answer's body, by Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    return await reader.readexactly(length)


async def _bodies(port: int, *sends: bytes, answers: int, pause_s: float = 0.05) -> list[bytes]:
    """Send each of `sends` as its own write (a pause between them), then read `answers` bodies."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        out = []
        for data in sends:
            writer.write(data)
            await writer.drain()
            await asyncio.sleep(pause_s)
        for _ in range(answers):
            out.append(await _read_answer(reader))
        return out
    finally:
        writer.close()


GET = b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("data, path", [
    (GET, b"/file"),
    (b"GET /file HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nUser-Agent: hls.js\r\n\r\n", b"/file"),
    (b"GET /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", None),
    (b"GET /file HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\n", None),
    (b"GET /file HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"a\"\r\n\r\n", None),
    (b"GET /file HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", None),
    (b"GET /file HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", None),
    (b"GET /file?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"GET /file HTTP/1.0\r\nHost: x\r\n\r\n", None),
    (b"HEAD /file HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (GET + GET, None),  # pipelined
    (GET[:-2], None),  # the head's end not here yet
    (b"GET /file HTTP/1.1\r\nHost: x\r\n\r\nGET", None),
])
def test_only_one_whole_plain_get_qualifies(data, path):
    assert fast_request_path(data) == path


def test_a_plain_get_is_answered_fast_and_others_by_aiohttp_on_the_same_connection():
    async def scenario(port, registry):
        bodies = await _bodies(port, GET, b"GET /file HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\n", GET,
                               b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n", GET, answers=5)
        return bodies, registry.fast_answers

    bodies, fast = asyncio.run(_serve(scenario))
    assert bodies[:3] == [b"fast", b"slow", b"fast"] and b"Not Found" in bodies[3] and bodies[4] == b"fast"
    assert fast == 3


def test_pipelined_and_split_requests_reach_aiohttp_in_order():
    async def scenario(port, _registry):
        pipelined = await _bodies(port, GET + GET + GET, answers=3)
        split = await _bodies(port, GET[:10], GET[10:], GET, answers=2)
        return pipelined, split

    pipelined, split = asyncio.run(_serve(scenario))
    assert pipelined == [b"slow"] * 3
    assert split == [b"slow", b"fast"]  # the split one by aiohttp; the next, whole, fast again


def test_after_a_body_the_next_request_goes_to_aiohttp_until_the_parser_is_between_requests():
    post = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"

    async def scenario(port, _registry):
        # The body arrives in a write of its own: aiohttp's parser is inside a request until it has it.
        return await _bodies(port, post, b"hello", GET, GET, answers=3)

    assert asyncio.run(_serve(scenario)) == [b"echo 5", b"slow", b"fast"]


def test_a_body_whose_bytes_look_like_a_request_is_never_answered_fast():
    post = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(GET)

    async def scenario(port, registry):
        bodies = await _bodies(port, post, GET, GET, GET, answers=3)  # the first GET is the body
        return bodies, registry.fast_answers

    bodies, fast = asyncio.run(_serve(scenario))
    assert bodies == [f"echo {len(GET)}".encode(), b"slow", b"fast"] and fast == 1


def test_fast_answers_restart_the_keep_alive_clock_and_an_idle_connection_still_closes():
    async def scenario(port, _registry):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            bodies = []
            for _ in range(8):  # 8 x 0.25 s: twice the 1 s keep-alive, answered fast throughout
                writer.write(GET)
                bodies.append(await _read_answer(reader))
                await asyncio.sleep(0.25)
            closed_after = await asyncio.wait_for(reader.read(), 5)  # idle now: the server closes
            return bodies, closed_after
        finally:
            writer.close()

    bodies, rest = asyncio.run(_serve(scenario, keepalive_s=1.0))
    assert bodies == [b"fast"] * 8 and rest == b""
