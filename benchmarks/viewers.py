"""Viewer load for `benchmarks/serve.py`: many MJPEG, fMP4 or HLS viewers in one asyncio process.

Each viewer behaves like a player, with the least client-side work that still moves every byte (bare
asyncio protocols, no stream readers: they stand in for players on other machines):
- mjpeg: one GET /stream.mjpg, then read and discard for as long as the load lasts;
- mp4: the same with GET /stream.mp4 (fragmented MP4, one fragment a frame: `moof` boxes are counted);
- hls: on one keep-alive connection, GET /hls/live.m3u8 once a second (hls.js polls a live playlist
  once per target duration, 1 s here), then every segment it has not fetched yet (the init segment once).

    python benchmarks/viewers.py --port 8000 --format hls --count 200 --seconds 20

Prints one JSON line: bytes read, requests made (HLS: their latency p50 / p99, request sent to body
read), MJPEG parts received, errors, and this process's CPU seconds. SIGUSR1 pauses the viewers and
SIGUSR2 resumes them (see Gate).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import time

SEGMENT = re.compile(r"^(seg_\w+\.m4s)$", re.M)
INIT = re.compile(r'#EXT-X-MAP:URI="([^"]+)"')


class Tally:
    def __init__(self):
        self.bytes = 0
        self.requests = 0
        self.latencies: list[float] = []  # seconds per HLS request
        self.parts = 0  # MJPEG parts (boundaries) received
        self.fragments = 0  # fMP4 fragments (`moof` box types) received
        self.errors: dict[str, int] = {}

    def error(self, err: BaseException) -> None:
        name = type(err).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


class HttpClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends a GET and collects its answer by Content-Length.

    A bare protocol, not asyncio streams: the viewers stand in for players on other machines, so
    the less CPU they take from the server's cores, the closer the measurement is to that."""

    def __init__(self, tally: Tally):
        self.tally = tally
        self.transport = None
        self._buffer = bytearray()
        self._want = -1  # body bytes expected; -1: still reading the head
        self._head_end = 0
        self._status = 0
        self._answer: asyncio.Future | None = None
        self._started = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get(self, path: str) -> asyncio.Future:
        self._answer = asyncio.get_running_loop().create_future()
        self._started = time.perf_counter()
        self.transport.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        return self._answer

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._want < 0:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end])
            self._status = int(head.split(b" ", 2)[1])
            self._want = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            self._head_end = end + 4
        if len(self._buffer) - self._head_end >= self._want:
            body = bytes(self._buffer[self._head_end:self._head_end + self._want])
            self.tally.latencies.append(time.perf_counter() - self._started)
            self.tally.requests += 1
            self.tally.bytes += self._head_end + self._want
            del self._buffer[:self._head_end + self._want]
            self._want = -1
            answer, self._answer = self._answer, None
            if answer is not None and not answer.done():
                if self._status != 200:
                    answer.set_exception(RuntimeError(f"HTTP {self._status}"))
                else:
                    answer.set_result(body)

    def connection_lost(self, exc) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionError("the server closed the connection"))


class MjpegClient(asyncio.Protocol):
    """Reads an endless stream and counts its bytes and MJPEG parts or fMP4 fragments (a marker split
    across reads is missed, and `moof` may occur by chance inside compressed data: both rare)."""

    def __init__(self, tally: Tally):
        self.tally = tally
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.tally.bytes += len(data)
        self.tally.parts += data.count(b"--skyrtframe")
        self.tally.fragments += data.count(b"moof")

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


class Gate:
    """Viewers play while the gate is open. SIGUSR1 closes it: MJPEG viewers hang up, HLS viewers stop
    asking; SIGUSR2 opens it: MJPEG viewers reconnect, HLS viewers poll again (serve.py's interleaved
    measurement: a paused viewer costs the server nothing, unlike a stopped process whose sockets the
    server keeps filling)."""

    def __init__(self):
        loop = asyncio.get_running_loop()
        self.opened = loop.create_future()
        self.opened.set_result(None)
        self.closing = loop.create_future()

    def close(self) -> None:
        if self.opened.done():
            self.opened = asyncio.get_running_loop().create_future()
            self.closing.set_result(None)

    def open(self) -> None:
        if not self.opened.done():
            self.closing = asyncio.get_running_loop().create_future()
            self.opened.set_result(None)

    async def wait_open(self, until: float) -> bool:
        """Wait for the gate to be open; False if `until` passes first."""
        if not self.opened.done():
            await asyncio.wait([self.opened], timeout=max(0.0, until - time.monotonic()))
        return self.opened.done() and time.monotonic() < until


async def mjpeg_viewer(port: int, until: float, tally: Tally, gate: Gate, path: str = "/stream.mjpg") -> None:
    loop = asyncio.get_running_loop()
    while await gate.wait_open(until):
        transport, client = await loop.create_connection(lambda: MjpegClient(tally), "127.0.0.1", port)
        try:
            transport.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            tally.requests += 1
            await asyncio.wait([client.closed, gate.closing], timeout=max(0.1, until - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
            if client.closed.done():
                raise ConnectionError("the server closed the stream")
        finally:
            transport.close()


async def mp4_viewer(port: int, until: float, tally: Tally, gate: Gate) -> None:
    await mjpeg_viewer(port, until, tally, gate, path="/stream.mp4")


async def hls_viewer(port: int, until: float, tally: Tally, gate: Gate) -> None:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(lambda: HttpClient(tally), "127.0.0.1", port)
    fetched: set[str] = set()
    try:
        while await gate.wait_open(until):
            playlist = (await client.get("/hls/live.m3u8")).decode()
            names = INIT.findall(playlist) + SEGMENT.findall(playlist)
            for name in names:
                if name not in fetched:
                    await client.get(f"/hls/{name}")
                    fetched.add(name)
            await asyncio.sleep(min(1.0, max(0.0, until - time.monotonic())))
    finally:
        transport.close()


def nearest_rank(ordered: list[float], q: float) -> float | None:
    """The q-quantile of sorted values (nearest rank), rounded to 0.1 ms; None for none."""
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4) if ordered else None


async def run(port: int, fmt: str, count: int, seconds: float) -> dict:
    tally = Tally()
    until = time.monotonic() + seconds
    viewer = {"mjpeg": mjpeg_viewer, "mp4": mp4_viewer, "hls": hls_viewer}[fmt]
    gate = Gate()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, gate.close)
    loop.add_signal_handler(signal.SIGUSR2, gate.open)

    async def one(i: int) -> None:
        await asyncio.sleep(i * 0.005)  # a ramp of 5 ms per viewer, as real audiences arrive
        try:
            await viewer(port, until, tally, gate)
        except (OSError, asyncio.IncompleteReadError, RuntimeError, ValueError, AttributeError) as err:
            tally.error(err)

    await asyncio.gather(*(one(i) for i in range(count)))
    latencies = sorted(tally.latencies)
    return {"format": fmt, "viewers": count, "seconds": seconds, "bytes": tally.bytes,
            "requests": tally.requests, "request_latency_p50_s": nearest_rank(latencies, 0.5),
            "request_latency_p99_s": nearest_rank(latencies, 0.99),
            "mjpeg_parts": tally.parts, "mp4_fragments": tally.fragments, "errors": tally.errors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--format", choices=("mjpeg", "mp4", "hls"), required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by this much")
    args = p.parse_args()
    if args.nice:
        os.nice(args.nice)
    try:  # uvloop where installed (ray[serve] brings it): ~15% less of the simulator's own CPU
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    report = asyncio.run(run(args.port, args.format, args.count, args.seconds))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
