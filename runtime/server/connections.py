"""The connection layer around aiohttp: a cap on connections (total and per client address), half-
closed clients kept, aiohttp's complaints about clients' bytes kept out of the log, and log lines
that cannot flood. Every request is parsed and answered by aiohttp; nothing here reads or writes
HTTP, and nothing here touches aiohttp's internals: connections are counted through asyncio's
public protocol interface around the protocol aiohttp's public `AppRunner.server` makes, and
admission is decided by a middleware.

An open port meets idle connection floods and garbage. Each connection costs a file descriptor, and
running out of them freezes everything (new viewers time out). So:

- At the cap, an idle connection (one that has no request in a handler: waiting for its next
  request, or for its first) is closed to make room; if none is idle, the new connection's first
  request is answered 503 JSON by `admission` and the connection closed (one that sends nothing is
  dropped after REFUSED_LINGER_S). Nothing is queued.
- A client that half-closes its side after the request (some players do) still gets its stream:
  the read side's end is not the connection's end while a request is in a handler.
- `RateLimitedLog` lets a repeated log line through a few times per interval and counts the rest.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("skyrt.server")

REFUSED_LINGER_S = 2.0  # a refused connection waits this long for its request before it is dropped


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


class Connection(asyncio.Protocol):
    """One accepted connection: aiohttp's protocol for it (`inner`, made by `AppRunner.server`) with
    every event passed on, and the bookkeeping the registry decides with."""

    def __init__(self, inner: asyncio.Protocol, registry: "ConnectionRegistry"):
        self.inner, self.registry = inner, registry
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        self.refused: str | None = None  # why, if refused at the cap
        self.busy = 0  # requests of this connection inside a handler (admission counts them)
        self.asked = False  # bytes came since the last answer ended: a request may be on its way in
        self.read_side_closed = False  # the client half-closed: the answer in progress is the last
        self._linger: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        return self.busy == 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else "local"
        self.registry.admit(self)
        if self.refused is not None:
            self._linger = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.abort)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.asked = True
        self.inner.data_received(data)

    def eof_received(self):
        if self.busy or self.asked:
            # Keep the write side open: the request that came before the end (often in the same read,
            # before its handler started) is answered, a stream goes on; admission closes after it.
            self.read_side_closed = True
            return True
        return self.inner.eof_received()  # between requests: nothing more can come

    def connection_lost(self, exc) -> None:
        if self._linger is not None:
            self._linger.cancel()
        self.registry.release(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ConnectionRegistry:
    """Who is connected, per client address; decides admission (event loop thread only)."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.by_address: dict[str, set[Connection]] = {}
        self.by_transport: dict[object, Connection] = {}
        self.count = 0
        self.refused = 0  # connections answered 503 at the cap
        self.shed = 0  # idle connections closed to make room
        self.gone = 0  # clients that went away mid-request or mid-stream (normal for viewers)

    def admit(self, conn: Connection) -> None:
        """Register `conn`, or mark it refused (with why; it is then not counted)."""
        self.by_transport[conn.transport] = conn
        peers = self.by_address.get(conn.address, set())
        if len(peers) >= self.limits.per_address and not self._shed_idle(peers):
            conn.refused = (f"too many connections from {conn.address} (limit {self.limits.per_address}); close "
                            f"some and retry (a reverse proxy needs --max-connections-per-address raised)")
        elif self.count >= self.limits.total and not self._shed_idle(
                c for cs in self.by_address.values() for c in cs):
            conn.refused = f"server at its connection limit ({self.limits.total}); retry in a few seconds"
        if conn.refused is not None:
            self.refused += 1
            log.debug("refused a connection from %s: %s", conn.address, conn.refused)
            return
        self.by_address.setdefault(conn.address, set()).add(conn)
        self.count += 1

    def release(self, conn: Connection) -> None:
        self.by_transport.pop(conn.transport, None)
        peers = self.by_address.get(conn.address)
        if peers is not None and conn in peers:
            peers.discard(conn)
            self.count -= 1
            if not peers:
                del self.by_address[conn.address]

    def of(self, transport) -> Connection | None:
        """The connection a request came on (None for a transport this registry did not accept)."""
        return self.by_transport.get(transport)

    def _shed_idle(self, conns) -> bool:
        """Close one idle connection among `conns`; False if none is idle."""
        for conn in conns:
            if conn.idle and conn.transport is not None and not conn.transport.is_closing():
                conn.transport.close()  # connection_lost releases it
                self.shed += 1
                return True
        return False


def admission(registry: ConnectionRegistry):
    """The middleware that answers a refused connection's request 503 JSON (and closes it), and
    marks a request's connection busy while its handler runs (a busy connection is never shed).
    Outermost, so that busy covers writing the answer."""
    from aiohttp import web

    @web.middleware
    async def admit(request, handler):
        conn = registry.of(request.transport)
        if conn is not None and conn.refused is not None:
            response = web.json_response({"error": conn.refused}, status=503, headers={"Retry-After": "5"})
            response.force_close()
            return response
        if conn is None:
            return await handler(request)
        conn.busy += 1
        try:
            response = await handler(request)
            if conn.read_side_closed:
                response.force_close()  # no request can follow: close once this answer is out
            return response
        finally:
            conn.busy -= 1
            conn.asked = False
    return admit


async def listen(runner, host: str, port: int, registry: ConnectionRegistry) -> asyncio.AbstractServer:
    """Accept connections for `runner` (set up) on host:port, each one through `registry`. The caller
    closes the returned server before `runner.cleanup()`; `bound_address(server)` is where it listens."""
    protocol_factory = runner.server  # aiohttp's public low-level server: a protocol factory
    return await asyncio.get_running_loop().create_server(lambda: Connection(protocol_factory(), registry),
                                                          host, port, reuse_address=True)


def bound_address(server: asyncio.AbstractServer) -> tuple[str, int]:
    host, port = server.sockets[0].getsockname()[:2]
    return host, port


def guarded_runner(app, registry: ConnectionRegistry, **kwargs):
    """An aiohttp AppRunner with the registry's keep-alive timeout (connections: `listen`)."""
    from aiohttp import web

    return web.AppRunner(app, keepalive_timeout=registry.limits.keepalive_timeout_s, **kwargs)


class ClientFaultsAtDebug(logging.Filter):
    """aiohttp logs every request it cannot parse at error level, with a traceback; on an open port
    that is the network's noise, not the server's fault. Such lines (an HTTP 4xx parser error) become
    debug lines; everything else passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500:
            record.levelno, record.levelname, record.exc_info, record.exc_text = logging.DEBUG, "DEBUG", None, None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


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
    logging.getLogger("aiohttp.server").addFilter(ClientFaultsAtDebug())
    return limiter
