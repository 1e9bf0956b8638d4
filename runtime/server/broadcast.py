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
        self._wakers: set[asyncio.Event] = set()  # one per waiting client; event loop thread only
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
        """On the event loop after every publish (and at close)."""
        for waker in self._wakers:
            waker.set()

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
        if bc.closed or bc._after(self.cursor)[0]:
            return
        waker = asyncio.Event()
        bc._wakers.add(waker)
        try:
            await asyncio.wait_for(waker.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            bc._wakers.discard(waker)
