"""The write deadline of every stream client, kept on one timer (event loop thread only).

A stream client's write returns at once unless aiohttp waits for the socket to drain. A timeout
context around each write arms and cancels a timer per frame per client, which costs more than the
write itself; instead each write is marked begun and ended here, and one timer looks at the writes
in flight every `period_s` (it is armed by the first write after it last found none in flight, so
at most once per period, whatever the number of clients). A write in flight longer than
`timeout_s` has its connection aborted: aiohttp's wait for the socket then ends, the client's next
step finds the transport closing, and `expired` tells it why.
"""
from __future__ import annotations

import asyncio


class WriteWatch:
    """Begun writes by key (a stream client's id), and the one timer that cuts stalled ones off."""

    def __init__(self, timeout_s: float, period_s: float | None = None):
        if timeout_s <= 0:
            raise ValueError(f"write timeout must be > 0 s, got {timeout_s}")
        self.timeout_s = timeout_s
        self.period_s = period_s if period_s is not None else min(1.0, timeout_s / 4)
        self._in_flight: dict[int, tuple[float, asyncio.BaseTransport]] = {}  # key -> (begun at, transport)
        self._expired: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, key: int, transport: asyncio.BaseTransport) -> None:
        """A write of client `key` on `transport` starts now."""
        loop = asyncio.get_running_loop()
        self._in_flight[key] = (loop.time(), transport)
        if self._timer is None:
            self._timer = loop.call_later(self.period_s, self._check)

    def end(self, key: int) -> None:
        """The write of client `key` returned (or failed)."""
        self._in_flight.pop(key, None)

    def expired(self, key: int) -> bool:
        """Whether client `key` was cut off here (asked once, when the client ends)."""
        if key in self._expired:
            self._expired.discard(key)
            return True
        return False

    def _check(self) -> None:
        self._timer = None
        if not self._in_flight:
            return
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.timeout_s
        for key, (begun, transport) in list(self._in_flight.items()):
            if begun <= cutoff:
                del self._in_flight[key]
                self._expired.add(key)
                # Abort, not close: close() would wait to flush the very send queue that stalled.
                transport.abort()
        if self._in_flight:
            self._timer = loop.call_later(self.period_s, self._check)

    def close(self) -> None:
        """Stop the timer (server shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
