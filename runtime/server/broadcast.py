"""One producer thread, many stream clients on the event loop: a fixed ring of the newest encoded items.

Every reader keeps its own cursor into the shared ring, which makes each reader's queue bounded
and drop-oldest without copying anything per client: a reader that falls more than `capacity`
items behind skips to the oldest item still held and counts what it missed. Formats whose items
depend on earlier ones (H.264 fragments) also skip ahead to the next keyframe, so a slow client
sees a jump, never a broken picture. Publishing (on the producer thread) is O(1) whatever the
number of readers.

A stream client is one task on the event loop (app.py): it waits in `Reader.wait()`, woken on the
loop right after each publish, and writes what `Reader.take()` returns through aiohttp's response.
While its socket has not taken the last write, it takes nothing: the items wait in the ring
(drop-oldest, as above) until the socket drains or the stall clock cuts the client off.

Waking is the per-client cost paid for every frame, so it is kept to the minimum asyncio allows: a
waiting client holds one bare future (no Event, no wait_for task, no timer of its own); a publish
resolves every waiting future in one callback on the loop; the waits' timeouts share one timer per
Broadcast, armed for the earliest deadline (a publish wakes everyone, so it is re-armed about once
per publish, not once per client).
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    seq: int
    payload: bytes
    keyframe: bool


class Broadcast:
    """A ring of the last `capacity` items of one output format (MJPEG frames, fMP4 fragments)."""

    def __init__(self, name: str, capacity: int, needs_keyframe: bool = False):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.name, self.needs_keyframe = name, needs_keyframe
        self.header = b""  # sent once to every new reader first (the fMP4 init segment)
        self._items: deque[Item] = deque(maxlen=capacity)
        self._seq = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Event loop thread only: (future, deadline) per waiting client, and the one timer for the
        # earliest deadline among them (None when nobody waits with a deadline pending).
        self._waiting: list[tuple[asyncio.Future, float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the event loop the clients wait on."""
        self._loop = loop

    def publish(self, payload: bytes, keyframe: bool = True) -> None:
        """Append an item (any thread); waiting clients are woken on the event loop."""
        with self._lock:
            self._seq += 1
            self._items.append(Item(self._seq, payload, keyframe))
        self._wake_clients()

    def close(self) -> None:
        """End every client's stream (server shutdown): each client's wait returns and its task ends."""
        self._closed = True
        self._wake_clients()

    @property
    def closed(self) -> bool:
        return self._closed

    def _wake_clients(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._set_wakers)
            except RuntimeError:  # the loop closed between the check and the call
                pass

    def _set_wakers(self) -> None:
        """On the event loop after every publish (and at close): every waiting client is woken."""
        waiting, self._waiting = self._waiting, []
        self._disarm()
        for future, _deadline in waiting:
            if not future.done():  # a client whose task was cancelled left its future cancelled
                future.set_result(None)

    def _add_waiter(self, timeout_s: float) -> asyncio.Future:
        """A future that a publish, the close, or `timeout_s` passing resolves (event loop thread)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        deadline = loop.time() + timeout_s
        self._waiting.append((future, deadline))
        if deadline < self._timer_at:
            self._disarm()
            self._timer, self._timer_at = loop.call_at(deadline, self._expire), deadline
        return future

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, float("inf")

    def _expire(self) -> None:
        """The shared timer: wake the waits whose deadline has come, re-arm for the next one."""
        self._timer, self._timer_at = None, float("inf")
        loop = asyncio.get_running_loop()
        now, kept = loop.time() + 0.001, []  # asyncio may run a timer a clock tick early
        for future, deadline in self._waiting:
            if future.done():
                continue
            if deadline <= now:
                future.set_result(None)
            else:
                kept.append((future, deadline))
        self._waiting = kept
        if kept:
            self._timer_at = min(deadline for _future, deadline in kept)
            self._timer = loop.call_at(self._timer_at, self._expire)

    def subscribe(self) -> "Reader":
        """A new reader, starting at the newest item it can decode from."""
        with self._lock:
            items = list(self._items)
        start = items[-1].seq - 1 if items else self._seq
        if self.needs_keyframe:
            keys = [it.seq for it in items if it.keyframe]
            start = keys[-1] - 1 if keys else self._seq
        return Reader(self, start)

    def subscribe_at_next_keyframe(self) -> "Reader":
        """A new reader that starts at the next keyframe published (nothing already held): for a
        viewer that plays what it gets at once (WebRTC), a backlog would only put it behind live."""
        with self._lock:
            reader = Reader(self, self._seq)
        reader._awaiting_keyframe = True
        return reader

    def _evicted_past(self, cursor: int) -> int:
        """How many items after `cursor` the ring has already dropped (a reader there lost them)."""
        with self._lock:
            oldest = self._items[0].seq if self._items else self._seq + 1
        return max(0, oldest - cursor - 1)

    def _after(self, cursor: int) -> tuple[list[Item], int]:
        """Items newer than `cursor` and how many were already evicted (lost to this reader).
        O(new items), not O(capacity): every reader calls this for every item published."""
        with self._lock:
            items = self._items
            if not items or items[-1].seq <= cursor:
                return [], 0
            newest, oldest = items[-1].seq, items[0].seq  # seqs are consecutive within the ring
            lost = max(0, oldest - cursor - 1)
            fresh = list(itertools.islice(reversed(items), newest - max(cursor, oldest - 1)))
        fresh.reverse()
        return fresh, lost


_reader_ids = itertools.count(1)


class Reader:
    """One client's view of a Broadcast: a cursor plus its drop count."""

    def __init__(self, broadcast: Broadcast, cursor: int):
        self.id = next(_reader_ids)
        self.broadcast, self.cursor = broadcast, cursor
        self.dropped = 0
        self._awaiting_keyframe = False

    @property
    def missed(self) -> int:
        """Items this reader lost: those counted when it took, and those the ring has dropped since
        that it has not reached yet (a client whose socket is full takes nothing, and misses all)."""
        return self.dropped + self.broadcast._evicted_past(self.cursor)

    def take(self) -> list[bytes]:
        """Every pending payload, now ([] if none): what was evicted before this reader got to it is
        counted as dropped, and a format that needs one restarts at a keyframe."""
        bc = self.broadcast
        items, lost = bc._after(self.cursor)
        if not items:
            return []
        self.cursor = items[-1].seq
        if lost:
            self.dropped += lost
            self._awaiting_keyframe = bc.needs_keyframe
        if self._awaiting_keyframe:
            keys = [i for i, it in enumerate(items) if it.keyframe]
            self.dropped += keys[0] if keys else len(items)
            if not keys:
                return []
            items = items[keys[0]:]
            self._awaiting_keyframe = False
        return [it.payload for it in items]

    async def wait(self, timeout_s: float) -> None:
        """Return once there is something to `take` (or the broadcast closed), or after `timeout_s`
        (event loop thread)."""
        bc = self.broadcast
        if bc.closed or bc._seq > self.cursor:  # an int read: no lock needed to see that items wait
            return
        await bc._add_waiter(timeout_s)
