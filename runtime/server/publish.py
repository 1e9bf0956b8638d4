"""Push the stream to an RTMP receiver (`skyrt serve --publish rtmp://HOST/APP/KEY`): a relay
(MediaMTX, nginx-rtmp), a restream service or a platform's ingest.

    pacer thread: leader libx264 ─ packet copies ─> PacketQueue (bounded) ─> publisher thread ─ FLV ─> rtmp://

A Publisher is an H.264 follower (encoders.py): it muxes copies of the one encode's packets, it never
runs a second libx264. The pacer only appends a copy to a bounded queue; a thread of the publisher's own
connects, muxes FLV and writes to the network, so a slow, absent or dying receiver costs the generator
and the other outputs nothing. When the queue is full the oldest GOP goes (drop-oldest to the next
keyframe: what is sent always decodes). A lost connection is retried with exponential backoff and
jitter, and a new connection starts at the newest keyframe, with timestamps from zero.

SRT is not offered: the FFmpeg bundled with PyAV has no `srt` protocol (no libsrt), so `srt://` is
refused up front; push RTMP to a relay that re-publishes SRT (MediaMTX does).

The network side runs in a child process (publish_relay.py: FLV on its stdin, copied to the URL):
FFmpeg's RTMP client connects while PyAV holds the interpreter lock and has no timeout, so in this
process a receiver that accepts and never answers would freeze every thread. The publisher thread
muxes FLV in memory and writes it to the child's pipe without blocking; a child that has not
connected within CONNECT_TIMEOUT_S, or takes nothing for STALL_S, is killed and the push reconnects.
"""
from __future__ import annotations

import io
import logging
import os
import random
import select
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from .encoders import _H264Output

log = logging.getLogger("skyrt.server")

# scheme -> FFmpeg muxer. rtmps is RTMP over TLS (FFmpeg's tls protocol, in PyAV's build).
MUXERS = {"rtmp": "flv", "rtmps": "flv"}
QUEUE_S = 2.0  # seconds of packets a publisher holds for a slow receiver before it drops the oldest GOP
STABLE_S = 10.0  # a connection that lasted this long resets the backoff
CONNECT_TIMEOUT_S = 10.0  # a relay that has not connected by then is killed (the receiver never answered)
STALL_S = 10.0  # a relay that takes no bytes for this long is killed (the receiver stopped reading)


class PublishUrlError(ValueError):
    """A --publish URL that cannot work; the message names the problem and the fix."""


def check_publish_url(url: str) -> str:
    """The FFmpeg muxer for a push URL (`flv` for rtmp:// and rtmps://); PublishUrlError if the URL
    cannot work: another scheme, no host, or no APP/KEY path (an RTMP receiver needs both)."""
    if not isinstance(url, str) or not url:
        raise PublishUrlError("--publish needs a URL such as rtmp://HOST/APP/KEY")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "srt":
        raise PublishUrlError(f"cannot publish to {redact(url)}: the FFmpeg bundled with PyAV has no SRT protocol "
                              f"(built without libsrt); publish rtmp://HOST/APP/KEY to a relay that serves SRT "
                              f"(MediaMTX re-publishes RTMP as SRT)")
    if scheme not in MUXERS:
        raise PublishUrlError(f"cannot publish to {redact(url)}: the scheme must be rtmp:// or rtmps://, "
                              f"e.g. rtmp://HOST/APP/KEY")
    if not parts.hostname:
        raise PublishUrlError(f"{redact(url)} names no host; use {scheme}://HOST[:PORT]/APP/KEY")
    try:
        parts.port
    except ValueError as err:
        raise PublishUrlError(f"{redact(url)}: bad port ({err}); use {scheme}://HOST[:PORT]/APP/KEY") from err
    path = [segment for segment in parts.path.split("/") if segment]
    if len(path) < 2:
        missing = "application name and stream key" if not path else "stream key"
        raise PublishUrlError(f"{redact(url)} has no {missing}: RTMP receivers take {scheme}://HOST[:PORT]/APP/KEY "
                              f"(e.g. rtmp://127.0.0.1/live/mystream; a platform shows its ingest URL and key)")
    return MUXERS[scheme]


def redact(url: str) -> str:
    """The URL without its stream key (the last path segment) or credentials: a stream key is a
    secret anyone can publish with, so logs, /status and /metrics never show it."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", _port(parts)
    if port is not None:
        host = f"{host}:{port}"
    path = [segment for segment in parts.path.split("/") if segment]
    if len(path) >= 2:
        path[-1] = "***"
    return f"{parts.scheme}://{host}/{'/'.join(path)}"


def _port(parts) -> int | None:
    try:
        return parts.port
    except ValueError:  # a bad port was refused by check_publish_url; redacting must not fail on it
        return None


@dataclass(frozen=True)
class Backoff:
    """Delays between connection attempts: first_s, doubling up to max_s, each scaled by a random
    factor in [1 - jitter, 1] so many servers that lost one relay do not come back in step."""

    first_s: float = 0.5
    max_s: float = 10.0
    jitter: float = 0.5

    def delay(self, failures: int, rng: random.Random) -> float:
        """The wait after `failures` (>= 1) failed attempts in a row."""
        base = min(self.max_s, self.first_s * 2.0 ** (max(1, failures) - 1))
        return base * (1.0 - self.jitter * rng.random())


class PacketQueue:
    """Packet copies from the pacer to the publisher thread, at most `capacity`, drop-oldest by whole
    GOPs: when full, the oldest packets up to the next keyframe go, so the queue always starts at a
    keyframe and what is sent decodes. Packets are `(data, pts, dts, time_base, is_keyframe)`."""

    def __init__(self, capacity: int):
        if capacity < 2:
            raise ValueError(f"a packet queue needs room for at least 2 packets, got {capacity}")
        self.capacity = capacity
        self._packets: deque[tuple] = deque()
        self._cond = threading.Condition()
        self._await_keyframe = True  # nothing sendable until a keyframe
        self.dropped = 0
        self.closed = False

    def put(self, packet: tuple) -> None:
        """Append a packet (pacer thread); never waits."""
        with self._cond:
            if self._await_keyframe and not packet[4]:
                self.dropped += 1  # a delta frame with no keyframe before it cannot be decoded
                return
            self._await_keyframe = False
            if len(self._packets) >= self.capacity:
                self._drop_oldest_gop()
                if not self._packets and not packet[4]:
                    self._await_keyframe = True
                    self.dropped += 1
                    return
            self._packets.append(packet)
            self._cond.notify()

    def _drop_oldest_gop(self) -> None:
        self._packets.popleft()
        self.dropped += 1
        while self._packets and not self._packets[0][4]:
            self._packets.popleft()
            self.dropped += 1

    def start_at_newest_keyframe(self) -> None:
        """Drop everything before the newest keyframe held (a new connection starts live, at a keyframe)."""
        with self._cond:
            newest = max((i for i, packet in enumerate(self._packets) if packet[4]), default=None)
            if newest is None:
                self.dropped += len(self._packets)
                self._packets.clear()
                self._await_keyframe = True
                return
            for _ in range(newest):
                self._packets.popleft()
                self.dropped += 1

    def take(self, timeout: float) -> tuple | None:
        """The oldest packet, waiting up to `timeout` s for one; None on timeout or once closed."""
        with self._cond:
            if not self._packets and not self.closed:
                self._cond.wait(timeout)
            return self._packets.popleft() if self._packets else None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._packets)


class RelayPipe(io.RawIOBase):
    """The write end of a publish_relay child: a file PyAV muxes into. Writes never block the thread
    for long: they wait for the pipe in short steps, fail once the child is gone, the publisher stops,
    or the child has taken nothing for STALL_S (then it is killed by close())."""

    def __init__(self, url: str, fmt: str, stop: threading.Event):
        super().__init__()
        self._stop = stop
        self._child = subprocess.Popen([sys.executable, "-m", "skyrt.runtime.server.publish_relay", url, fmt],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for pipe in (self._child.stdin, self._child.stdout):
            os.set_blocking(pipe.fileno(), False)
        self._said = b""
        self._url = url

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        deadline = time.monotonic() + STALL_S
        while view:
            if self._stop.is_set():
                raise ConnectionAbortedError("the server is stopping")
            self._check_child()
            _, ready, _ = select.select([], [self._child.stdin], [], 0.2)
            if ready:
                try:
                    sent = os.write(self._child.stdin.fileno(), view)
                except BlockingIOError:
                    sent = 0
                if sent:
                    view, deadline = view[sent:], time.monotonic() + STALL_S
            if time.monotonic() > deadline:
                raise TimeoutError(f"the receiver took nothing for {STALL_S:g} s")
        return len(data)

    def poll(self) -> bool:
        """Whether the child has said it is connected (reads what it printed, never waits)."""
        try:
            self._said += os.read(self._child.stdout.fileno(), 256) or b""
        except BlockingIOError:
            pass
        self._check_child()
        return b"connected" in self._said

    def _check_child(self) -> None:
        if self._child.poll() is not None:
            why = (self._child.stderr.read() or b"").decode(errors="replace").strip().splitlines()
            raise ConnectionError(why[-1] if why else f"the relay exited with {self._child.returncode}")

    def close(self) -> None:
        """End the child: EOF on its stdin, then a kill if it has not left within a second."""
        if self.closed:
            return
        try:
            self._child.stdin.close()
        except OSError:
            pass
        try:
            self._child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait(timeout=5.0)
        for pipe in (self._child.stdout, self._child.stderr):
            pipe.close()
        super().close()


class Publisher(_H264Output):
    """One push target: follows `leader` (an encoding H.264 output) and sends its packets to `url`
    from a thread of its own, reconnecting with `backoff` when the connection fails."""

    name = "publish"

    def __init__(self, url: str, leader: _H264Output, fps: int, queue_s: float = QUEUE_S,
                 backoff: Backoff = Backoff(), seed: int | None = None):
        if leader is None or not leader.encodes:
            raise ValueError("a publisher follows an H.264 output that encodes (an mp4 or hls output)")
        self.url, self.target = url, redact(url)
        self.format = check_publish_url(url)
        super().__init__(None, fps, 0, 0, leader)  # a follower: no stream of its own until the first packet
        self.queue = PacketQueue(max(2, int(queue_s * fps)))
        self.backoff = backoff
        self._rng = random.Random(seed)
        self._template = None  # a stream holding the leader's codec parameters (SPS/PPS), set on the pacer
        self._template_ready = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the figures below (read by /status and /metrics)
        self.connected = False
        self.connects = 0  # connections made (the first one and every reconnect)
        self.failures = 0  # attempts and connections that failed
        self.packets_sent = 0
        self.bytes_sent = 0  # H.264 payload bytes sent (FLV and RTMP framing not included)
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"skyrt-publish {self.target}", daemon=True)
        self._thread.start()

    # -- pacer thread
    def _mux_copy(self, copy: tuple, template) -> None:
        """Called by the leader for every packet: queue it, never wait, never raise (a failure is
        reported from this output's own encode(), as for any follower)."""
        try:
            if self._template is None:
                import av

                # The leader's stream is the pacer's: copy its codec parameters once, into a stream that
                # only this publisher reads (every connection's FLV stream is made from it).
                holder = av.open(io.BytesIO(), mode="w", format=self.format)
                self._template = (holder, holder.add_stream_from_template(template))
                self._template_ready.set()
            self.queue.put(copy)
        except Exception as err:  # one broken output must not take the leader down
            self._follower_error = err

    # -- publisher thread
    def _run(self) -> None:
        while not self._template_ready.wait(0.2):
            if self._stop.is_set():
                return
        failures_in_a_row = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._session()
            except Exception as err:  # the receiver went away, refused us, or the network failed
                self._record_failure(err)
            with self._lock:
                self.connected = False
            if self._stop.is_set():
                return
            failures_in_a_row = 1 if time.monotonic() - started >= STABLE_S else failures_in_a_row + 1
            self._stop.wait(self.backoff.delay(failures_in_a_row, self._rng))

    def _session(self) -> None:
        """One connection: a relay child, FLV from the newest keyframe, until it fails or we stop."""
        import av

        self.queue.start_at_newest_keyframe()
        first = self.queue.take(timeout=1.0)
        if first is None:
            return  # nothing to send yet (the pacer is slow): try again without counting a failure
        relay = RelayPipe(self.url, self.format, self._stop)
        flv = None
        try:
            flv = av.open(relay, mode="w", format=self.format, buffer_size=4096, options={"flush_packets": "1"})
            stream = flv.add_stream_from_template(self._template[1])
            base = first[2]  # every connection's timestamps start at zero
            packet, opened = first, time.monotonic()
            while not self._stop.is_set():
                if packet is not None:
                    self._send(flv, stream, packet, base)
                if relay.poll() and not self.connected:
                    with self._lock:
                        self.connected = True
                        self.connects += 1
                    log.info("publishing to %s (connection %d)", self.target, self.connects)
                if not self.connected and time.monotonic() - opened > CONNECT_TIMEOUT_S:
                    raise TimeoutError(f"the receiver did not take the stream within {CONNECT_TIMEOUT_S:g} s")
                packet = self.queue.take(timeout=0.5)
        finally:
            if flv is not None:
                try:
                    flv.close()
                except Exception:  # a dead relay takes no trailer
                    pass
            relay.close()

    def _send(self, container, stream, copy: tuple, base: int) -> None:
        import av

        data, pts, dts, time_base, keyframe = copy
        packet = av.Packet(data)
        packet.pts, packet.dts, packet.time_base, packet.is_keyframe = pts - base, dts - base, time_base, keyframe
        packet.stream = stream
        container.mux(packet)
        with self._lock:
            self.packets_sent += 1
            self.bytes_sent += len(data)

    def _record_failure(self, err: Exception) -> None:
        with self._lock:
            self.failures += 1
            first_of_outage = self.last_error is None or self.connected
            self.last_error = f"{type(err).__name__}: {err}".replace(self.url, self.target)[:300]
        if first_of_outage:
            log.warning("publishing to %s failed (%s); retrying with backoff", self.target, self.last_error)
        else:
            log.debug("publishing to %s failed again (%s)", self.target, self.last_error)

    # -- any thread
    def state(self) -> dict:
        """This target's figures for /status."""
        with self._lock:
            return {"target": self.target, "connected": self.connected, "connects": self.connects,
                    "reconnects": max(0, self.connects - 1), "failures": self.failures,
                    "packets_sent": self.packets_sent, "bytes_sent": self.bytes_sent,
                    "dropped_packets": self.queue.dropped, "queued_packets": len(self.queue),
                    "last_error": self.last_error}

    def close(self) -> None:
        """Stop the thread (it closes its connection); waits briefly: a send blocked on a dead
        network is left to the daemon thread."""
        self._stop.set()
        self.queue.close()
        self._thread.join(timeout=2.0)


def prometheus_text(publishers: list[Publisher]) -> str:
    """The publishers' figures in Prometheus text format (appended to /metrics)."""
    if not publishers:
        return ""
    states = [p.state() for p in publishers]
    lines: list[str] = []
    for name, kind, key, help_text in (
            ("skyrt_publish_connected", "gauge", "connected", "1 while the push target is connected."),
            ("skyrt_publish_reconnects_total", "counter", "reconnects", "Connections made after the first."),
            ("skyrt_publish_failures_total", "counter", "failures", "Connection attempts and connections that failed."),
            ("skyrt_publish_packets_total", "counter", "packets_sent", "H.264 packets handed to the relay process."),
            ("skyrt_publish_bytes_total", "counter", "bytes_sent", "H.264 payload bytes sent."),
            ("skyrt_publish_dropped_packets_total", "counter", "dropped_packets",
             "Packets dropped (whole GOPs) because the target was slow or away.")):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{target="{s["target"]}"}} {int(s[key])}' for s in states]
    return "\n".join(lines) + "\n"
