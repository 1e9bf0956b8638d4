"""Viewer load for `benchmarks/serve.py`: many MJPEG or HLS viewers in one asyncio process.

Each viewer behaves like a player, with the least client-side work that still moves every byte:
- mjpeg: one GET /stream.mjpg, then read and discard for as long as the load lasts;
- hls: on one keep-alive connection, GET /hls/live.m3u8 once a second (hls.js polls a live playlist
  once per target duration, 1 s here), then every segment it has not fetched yet (the init segment once).

    python benchmarks/viewers.py --port 8000 --format hls --count 200 --seconds 20

Prints one JSON line: bytes read, requests made (HLS: their latency p50 / p99, request sent to body
read), MJPEG parts received, errors, and this process's CPU seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import time

SEGMENT = re.compile(r"^(seg_\w+\.m4s)$", re.M)
INIT = re.compile(r'#EXT-X-MAP:URI="([^"]+)"')


class Tally:
    def __init__(self):
        self.bytes = 0
        self.requests = 0
        self.latencies: list[float] = []  # seconds per HLS request
        self.parts = 0  # MJPEG parts (boundaries) received
        self.errors: dict[str, int] = {}

    def error(self, err: BaseException) -> None:
        name = type(err).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


async def _get(reader, writer, path: str, tally: Tally) -> bytes:
    """One GET on a keep-alive connection; the body by Content-Length."""
    started = time.perf_counter()
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    body = await reader.readexactly(length)
    tally.latencies.append(time.perf_counter() - started)
    tally.requests += 1
    tally.bytes += len(head) + length
    if status != 200:
        raise RuntimeError(f"HTTP {status} for {path}")
    return body


async def mjpeg_viewer(port: int, until: float, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        tally.requests += 1
        while time.monotonic() < until:
            chunk = await asyncio.wait_for(reader.read(65536), max(0.1, until - time.monotonic()))
            if not chunk:
                raise ConnectionError("the server closed the stream")
            tally.bytes += len(chunk)
            tally.parts += chunk.count(b"--skyrtframe")  # a boundary split across reads is missed (rare)
    except asyncio.TimeoutError:
        pass
    finally:
        writer.close()


async def hls_viewer(port: int, until: float, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    fetched: set[str] = set()
    try:
        while time.monotonic() < until:
            playlist = (await _get(reader, writer, "/hls/live.m3u8", tally)).decode()
            names = INIT.findall(playlist) + SEGMENT.findall(playlist)
            for name in names:
                if name not in fetched:
                    await _get(reader, writer, f"/hls/{name}", tally)
                    fetched.add(name)
            await asyncio.sleep(min(1.0, max(0.0, until - time.monotonic())))
    finally:
        writer.close()


def nearest_rank(ordered: list[float], q: float) -> float | None:
    """The q-quantile of sorted values (nearest rank), rounded to 0.1 ms; None for none."""
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4) if ordered else None


async def run(port: int, fmt: str, count: int, seconds: float) -> dict:
    tally = Tally()
    until = time.monotonic() + seconds
    viewer = {"mjpeg": mjpeg_viewer, "hls": hls_viewer}[fmt]

    async def one(i: int) -> None:
        await asyncio.sleep(i * 0.005)  # a ramp of 5 ms per viewer, as real audiences arrive
        try:
            await viewer(port, until, tally)
        except (OSError, asyncio.IncompleteReadError, RuntimeError, ValueError, AttributeError) as err:
            tally.error(err)

    await asyncio.gather(*(one(i) for i in range(count)))
    latencies = sorted(tally.latencies)
    return {"format": fmt, "viewers": count, "seconds": seconds, "bytes": tally.bytes,
            "requests": tally.requests, "request_latency_p50_s": nearest_rank(latencies, 0.5),
            "request_latency_p99_s": nearest_rank(latencies, 0.99),
            "mjpeg_parts": tally.parts, "errors": tally.errors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--format", choices=("mjpeg", "hls"), required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by this much")
    args = p.parse_args()
    if args.nice:
        os.nice(args.nice)
    report = asyncio.run(run(args.port, args.format, args.count, args.seconds))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
