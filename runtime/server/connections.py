"""The connection layer under aiohttp: a cap on connections (total and per client address), JSON
for aiohttp's own protocol errors, half-closed clients kept, and log lines that cannot flood.

An open port meets idle connection floods and garbage. Each connection costs a file descriptor, and
running out of them freezes everything (HLS files cannot be opened, new viewers time out). So:

- At the cap, an idle keep-alive connection (one waiting for its next request) is closed to make
  room; if none is idle, the new connection gets a 503 JSON answer and is closed. Nothing is queued.
- A malformed request gets a 400 JSON error like every other refusal, logged at debug level.
- A client that half-closes its side after the request (some players do) still gets its stream:
  the read side's end is not the connection's end.
- `RateLimitedLog` lets a repeated log line through a few times per interval and counts the rest.

The fast path: a GET that arrives whole in one read, with no body and nothing after it, on a
connection with nothing in progress, is offered to the app's `fast_answer(path)` (app.py) before
aiohttp parses it. If that returns bytes (an HLS file held in memory), they are written as the whole
answer and the connection waits for its next request, as after any keep-alive answer; aiohttp never
sees the request. Everything else (a miss, another method, a body, a Range or conditional or closing
request, a pipelined or split one) goes to aiohttp unchanged. aiohttp costs ~0.2 ms of CPU per
request; 200 HLS viewers make ~470 requests a second, on the cores that generate the video.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("skyrt.server")

REFUSED_LINGER_S = 2.0  # a refused connection waits this long for its request before it is dropped
FAST_REQUEST_MAX_BYTES = 8192
_FAST_REQUEST_LINE = re.compile(rb"GET (/[!-~]{1,512}) HTTP/1\.1\r\n")
# Headers that change what a GET means or how its connection goes on: such requests go to aiohttp.
# (`Connection: keep-alive`, which browsers send, changes nothing in HTTP/1.1 and is allowed.)
_NOT_FAST = re.compile(rb"(?i)\n(?:content-length|transfer-encoding|expect|upgrade|range|if-[a-z-]*|te|trailer)"
                       rb"[ \t]*:")
_CONNECTION = re.compile(rb"(?i)\nconnection[ \t]*:[ \t]*([^\r\n]*)")


def fast_request_path(data: bytes) -> bytes | None:
    """The path of `data` if it is exactly one plain GET request head (see the module docstring)."""
    if len(data) > FAST_REQUEST_MAX_BYTES or not data.endswith(b"\r\n\r\n") or data.count(b"\r\n\r\n") != 1:
        return None
    line = _FAST_REQUEST_LINE.match(data)
    if line is None or b"?" in line.group(1):
        return None
    headers = line.end() - 2  # from the request line's CRLF: each header starts after a \n
    if _NOT_FAST.search(data, headers) or any(value.strip().lower() != b"keep-alive"
                                              for value in _CONNECTION.findall(data, headers)):
        return None
    return line.group(1)


@dataclass(frozen=True)
class ConnectionLimits:
    """Most open connections, in all and from one client address (behind a reverse proxy every
    connection comes from the proxy's address: raise `per_address` to `total` there)."""

    total: int = 1000
    per_address: int = 256
    keepalive_timeout_s: float = 15.0  # an idle keep-alive connection is closed after this long

    def __post_init__(self):
        if self.total < 1 or self.per_address < 1:
            raise ValueError(f"connection limits must be >= 1, got total={self.total}, "
                             f"per_address={self.per_address}")


def _refusal_bytes(message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 5\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class ConnectionRegistry:
    """Who is connected, per client address; decides admission (event loop thread only)."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.by_address: dict[str, set] = {}
        self.count = 0
        self.refused = 0  # connections answered 503 at the cap
        self.shed = 0  # idle keep-alive connections closed to make room
        self.gone = 0  # clients that went away mid-request or mid-stream (normal for viewers)
        self.fast_answers = 0  # requests answered on the fast path (see the module docstring)

    def admit(self, handler, address: str) -> str | None:
        """Register `handler` and return None, or return why it is refused (it is then not registered)."""
        peers = self.by_address.get(address, set())
        if len(peers) >= self.limits.per_address and not self._shed_idle(peers):
            return (f"too many connections from {address} (limit {self.limits.per_address}); close some "
                    f"and retry (a reverse proxy needs --max-connections-per-address raised)")
        if self.count >= self.limits.total and not self._shed_idle(
                h for hs in self.by_address.values() for h in hs):
            return f"server at its connection limit ({self.limits.total}); retry in a few seconds"
        self.by_address.setdefault(address, set()).add(handler)
        self.count += 1
        return None

    def release(self, handler, address: str) -> None:
        peers = self.by_address.get(address)
        if peers is not None and handler in peers:
            peers.discard(handler)
            self.count -= 1
            if not peers:
                del self.by_address[address]

    def _shed_idle(self, handlers) -> bool:
        """Close one idle keep-alive connection among `handlers`; False if none is idle."""
        for handler in handlers:
            if handler.is_idle():
                handler.force_close()  # connection_lost releases it
                self.shed += 1
                return True
        return False


def guarded_runner(app, registry: ConnectionRegistry, fast_answer: Callable[[bytes], bytes | None] | None = None,
                   **kwargs):
    """An aiohttp AppRunner whose connections go through `registry` (classes built here so the module
    imports without aiohttp). fast_answer: see the module docstring; None turns the fast path off."""
    import aiohttp
    from aiohttp import web
    from aiohttp.streams import EMPTY_PAYLOAD
    from aiohttp.web_protocol import RequestHandler

    used = ("_waiter", "_request_in_progress", "_messages", "_request_count", "_next_keepalive_close_time",
            "_keepalive_handle", "_keepalive_timeout", "_keepalive", "_payload_parser", "_close", "_force_close",
            "_upgraded")
    missing = [name for name in used if not any(name in getattr(cls, "__slots__", ())
                                                   for cls in RequestHandler.__mro__)]
    if missing or not hasattr(RequestHandler, "force_close"):
        raise RuntimeError(f"aiohttp {aiohttp.__version__} changed the internals skyrt's connection guard uses "
                           f"({', '.join(missing) or 'force_close'}); install the tested release: "
                           f"pip install 'aiohttp>=3.14,<3.15'")

    class GuardedRequestHandler(RequestHandler):
        """aiohttp's per-connection protocol, admitted by the registry; see the module docstring."""

        _address = "?"
        _refused = False
        _admitted = False
        _at_boundary = True  # aiohttp's parser holds no part of a request (the fast path may answer)

        def connection_made(self, transport) -> None:
            peer = transport.get_extra_info("peername")
            self._address = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else "local"
            why = registry.admit(self, self._address)
            if why is None:
                self._admitted = True
                super().connection_made(transport)
                return
            # Refused: answer once the request arrives (reading it first means close() sends a FIN,
            # not a reset that could discard the answer), or drop the socket if none comes.
            registry.refused += 1
            self._refused, self._why, self._refused_transport = True, why, transport
            self._linger = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.abort)
            log.debug("refused a connection from %s: %s", self._address, why)

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                if fast_answer is not None and self._answer_fast(data):
                    return None
                count = self._request_count
                super().data_received(data)
                self._at_boundary = self._ends_on_boundary(data, count)
                return None
            transport, self._refused_transport = self._refused_transport, None
            if transport is not None and not transport.is_closing():
                transport.write(_refusal_bytes(self._why))
                transport.close()

        def _answer_fast(self, data: bytes) -> bool:
            """Answer `data` on the fast path if it qualifies (see the module docstring)."""
            if not (self._at_boundary and self._keepalive and self.is_idle() and not self._messages
                    and self._payload_parser is None and not self._upgraded and not self._close
                    and not self._force_close and self.transport is not None):
                return False
            path = fast_request_path(data)
            answer = None if path is None else fast_answer(path)
            if answer is None:
                return False
            self.transport.write(answer)
            # The keep-alive clock restarts as after any answer (its timer re-arms itself from this).
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            if self._keepalive_handle is None and self._keepalive_timeout > 0:
                self._keepalive_handle = self._loop.call_at(self._next_keepalive_close_time, self._process_keepalive)
            registry.fast_answers += 1
            return True

        def _ends_on_boundary(self, data: bytes, count_before: int) -> bool:
            """Whether aiohttp's parser, just fed `data`, ended exactly after a bodiless request: only
            then may the next read start a request of its own."""
            return (self._request_count > count_before and data.endswith(b"\r\n\r\n") and bool(self._messages)
                    and self._messages[-1][1] is EMPTY_PAYLOAD and not self._upgraded)

        def eof_received(self):
            if self._refused:
                return None
            if self.is_idle():  # between requests: nothing more can come, so nothing is lost
                self.force_close()
                return None
            # Keep the write side open: the response in progress (a stream) goes on; the connection
            # closes after it, since no further request can come.
            self.close()
            return True

        def connection_lost(self, exc) -> None:
            if self._refused:
                self._linger.cancel()
                return
            if self._admitted:
                self._admitted = False
                registry.release(self, self._address)
            super().connection_lost(exc)

        def is_idle(self) -> bool:
            """Waiting for a request (keep-alive or never sent one), nothing in progress."""
            waiter = self._waiter
            return not self._request_in_progress and waiter is not None and not waiter.done()

        def handle_error(self, request, status: int = 500, exc=None, message=None):
            """aiohttp's own errors (malformed requests, mostly) as JSON, logged at debug level."""
            log.debug("HTTP %d for %s: %s", status, request.remote, message or exc)
            if request.writer.output_size > 0:  # the answer already started: the connection is broken
                raise ConnectionError("response already started; cannot send an error")
            text = "bad HTTP request" if status == 400 else "internal error (logged on the server)"
            # The parser's first line says what was wrong; the rest echoes the client's bytes back.
            detail = (message or (str(exc) if status == 400 and exc else "")).strip().split("\n", 1)[0][:200]
            response = web.json_response({"error": f"{text}: {detail}" if detail else text}, status=status)
            response.force_close()
            return response

    class GuardedServer(web.Server):
        def __call__(self):
            return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)

    class GuardedAppRunner(web.AppRunner):
        async def _make_server(self):
            plain = await super()._make_server()  # runs the app's startup hooks
            return GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                                 handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                                 **plain._kwargs)

    return GuardedAppRunner(app, keepalive_timeout=registry.limits.keepalive_timeout_s, **kwargs)


class RateLimitedLog(logging.Filter):
    """Lets each distinct log line (logger, level, message template) through `burst` times per
    `interval_s`; the rest are counted and the next line let through says how many were dropped."""

    def __init__(self, burst: int = 5, interval_s: float = 10.0):
        super().__init__()
        self.burst, self.interval_s = burst, interval_s
        self._seen: dict[tuple, list] = {}  # key -> [window start, count in window, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.interval_s:
            suppressed = entry[2] if entry is not None else 0
            self._seen[key] = entry = [now, 0, 0]
            if len(self._seen) > 10_000:  # a bound on the bookkeeping itself
                self._seen = {key: entry}
            if suppressed:
                record.msg = f"{record.msg} ({suppressed} similar lines suppressed)"
        entry[1] += 1
        if entry[1] <= self.burst:
            return True
        entry[2] += 1
        return False


def install_log_rate_limit(names=("skyrt.server", "aiohttp.server", "aiohttp.web", "aiohttp.access",
                                  "asyncio")) -> RateLimitedLog:
    """Attach one `RateLimitedLog` to the loggers an open port can make talk."""
    limiter = RateLimitedLog()
    for name in names:
        logging.getLogger(name).addFilter(limiter)
    return limiter
