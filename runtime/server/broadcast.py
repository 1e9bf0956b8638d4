"""One producer thread, many stream clients on the event loop: a fixed ring of the newest encoded items.

Every reader keeps its own cursor into the shared ring, which makes each reader's queue bounded
and drop-oldest without copying anything per client: a reader that falls more than `capacity`
items behind skips to the oldest item still held and counts what it missed. Formats whose items
depend on earlier ones (H.264 fragments) also skip ahead to the next keyframe, so a slow client
sees a jump, never a broken picture. Publishing (on the producer thread) is O(1) whatever the
number of readers.

A stream client is served by a `Pusher`: on the event loop, right after each publish, every pusher
writes its client's new items straight to the socket, so a client that keeps up costs one socket
write per item and no task switch. A pusher whose socket did not take everything stops and wakes its
client's task, which waits for the socket under the stall clock and then resumes it (catching up
from the ring, drop-oldest as above).
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable


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
        self._pushers: set[Pusher] = set()  # event loop thread only
        self._closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the event loop the pushers run on."""
        self._loop = loop

    def publish(self, payload: bytes, keyframe: bool = True) -> None:
        """Append an item (any thread); the pushers write it on the event loop."""
        with self._lock:
            self._seq += 1
            self._items.append(Item(self._seq, payload, keyframe))
        self._wake_pushers()

    def close(self) -> None:
        """End every client's stream (server shutdown): each pusher stops and its task returns."""
        self._closed = True
        self._wake_pushers()

    @property
    def closed(self) -> bool:
        return self._closed

    def _wake_pushers(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._offer_to_pushers)
            except RuntimeError:  # the loop closed between the check and the call
                pass

    def _offer_to_pushers(self) -> None:
        """On the event loop after every publish (and at close)."""
        for pusher in list(self._pushers):
            pusher.offer()

    def attach(self, pusher: "Pusher") -> None:
        """Let `pusher` write after every publish until `detach` (event loop thread)."""
        self._pushers.add(pusher)

    def detach(self, pusher: "Pusher") -> None:
        self._pushers.discard(pusher)

    def subscribe(self) -> "Reader":
        """A new reader, starting at the newest item it can decode from."""
        with self._lock:
            items = list(self._items)
        start = items[-1].seq - 1 if items else self._seq
        if self.needs_keyframe:
            keys = [it.seq for it in items if it.keyframe]
            start = keys[-1] - 1 if keys else self._seq
        return Reader(self, start)

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


class Pusher:
    """Writes one client's new items to its socket from the publish callback (see the module docstring).

    encode: a batch of payloads -> the bytes to write (the client's packing and HTTP chunk framing).
    The client's task loops on `stopped()`: it returns when the pusher stopped because its socket holds
    unsent bytes (wait for it to drain, under the stall clock, then `resume()`), the client is gone
    (`gone`), or the broadcast closed."""

    def __init__(self, reader: Reader, transport, encode: Callable[[list[bytes]], bytes]):
        self.reader, self.transport, self.encode = reader, transport, encode
        self.blocked = False  # the socket holds unsent bytes: the task waits for it, not the pusher
        self._wake: asyncio.Future | None = None

    @property
    def gone(self) -> bool:
        return self.transport.is_closing()

    def offer(self) -> None:
        """Write whatever is new, unless blocked (event loop thread)."""
        if self.blocked:
            return
        if self.gone or self.reader.broadcast.closed:
            self._signal()
            return
        batch = self.reader.take()
        if batch:
            self.send(self.encode(batch))

    def send(self, data: bytes) -> None:
        """Write `data`; if the socket did not take all of it, stop and wake the task."""
        self.transport.write(data)
        if self.transport.get_write_buffer_size():
            self.blocked = True
            self._signal()

    async def stopped(self) -> None:
        """Return once blocked, gone or closed (at once if already)."""
        while not (self.blocked or self.gone or self.reader.broadcast.closed):
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake

    def resume(self) -> None:
        """The socket took everything: write what arrived meanwhile and go on pushing."""
        self.blocked = False
        self.offer()

    def _signal(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.done():
            wake.set_result(None)
