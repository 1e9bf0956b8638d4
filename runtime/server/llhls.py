"""Low-latency HLS (`GET /llhls/live.m3u8`): 1 s segments published in parts of a few frames
(EXT-X-PART, PART-TARGET 0.25 s by default), a preload hint for the next part, and blocking playlist
reload (`?_HLS_msn=M&_HLS_part=P` waits for that part). The plain playlist (/hls/live.m3u8) stays for
players without LL-HLS.

    leader libx264 ─ packet copies ─> Fmp4Encoder (follower, a fragment per frame) ─> LlHlsPackager
        a part: the fragments (moof + mdat) of `part_frames` frames; a segment: its parts, concatenated
        ─> LlHlsWindow (bytes in memory, pacer thread) ─> handlers (event loop), woken per part

A part is a run of whole fMP4 fragments, and a segment the concatenation of its parts, so a player
that loads parts and one that loads segments decode the same bytes. Segments start at keyframes (one
a second, encoders.h264_options); the first part of each is INDEPENDENT. Every segment carries the
wall time of its first frame (EXT-X-PROGRAM-DATE-TIME): a player's position maps to a time, which
is how latency behind live is measured (hls.js `playingDate`).
"""
from __future__ import annotations

import asyncio
import math
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .encoders import Fmp4Encoder, _H264Output

PLAYLIST = "live.m3u8"
CONTENT_TYPES = {"m3u8": "application/vnd.apple.mpegurl", "m4s": "video/iso.segment", "mp4": "video/mp4"}
PART_TARGET_S = 0.25
SEGMENTS = 6  # complete segments listed
PARTS_FOR = 3  # the last this many segments list their parts (older parts roll out, as the spec asks)
BLOCK_TIMEOUT_S = 3.0  # a blocking request answers with what exists after this long (3 target durations)
_PART_NAME = re.compile(r"^llpart_([0-9a-f]+)_(\d+)_(\d+)\.m4s$")


@dataclass
class Segment:
    msn: int
    name: str
    date: float  # wall time of its first frame
    parts: list[tuple[str, float, bool]] = field(default_factory=list)  # (name, seconds, independent)
    duration: float = 0.0  # set when complete


class LlHlsWindow:
    """The live LL-HLS files and playlist (written on the pacer thread, read on the event loop).

    Every publish replaces `files` and `playlist` whole and then wakes the waiting requests through
    the event loop (`bind` it first); a reader never sees half a part."""

    def __init__(self, fps: int, part_frames: int, run: str, first_msn: int = 0, discontinuity: bool = False):
        self.fps, self.part_frames, self.run = fps, part_frames, run
        # A restarted server (--state) numbers on from the wall clock (later than any segment of the run
        # before it) and marks its first segment as a discontinuity: players reload onto a continuing
        # media sequence and know that the stream was spliced there.
        self.first_msn, self.discontinuity = first_msn, discontinuity
        self.part_target = part_frames / fps
        # Frames from one keyframe to the next (encoders.h264_options: one GOP a second, no scene cuts).
        # A segment that holds them all ends at the next frame, so the part after its last one is the
        # next segment's first: that is the part to hint, not one that will never be made.
        self.gop_frames = fps
        self._current_frames = 0  # frames in the current segment's finished parts
        self.init_name = f"llinit_{run}.mp4"
        self.files: dict[str, bytes] = {}
        self.playlist: bytes | None = None
        self.latest_part: tuple[int, int] = (-1, -1)  # (msn, part) of the newest published part
        self.latest_segment = -1  # msn of the newest complete segment
        self._segments: deque[Segment] = deque()  # complete, oldest first
        self._current: Segment | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._lock = threading.Lock()  # publish vs bind

    # -- event loop side
    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if self._loop is None:
                self._loop, self._changed = loop, asyncio.Event()

    def has(self, msn: int, part: int | None) -> bool:
        """Whether the playlist holds segment `msn` complete, or (with `part`) that part or a later one."""
        if msn <= self.latest_segment:
            return True
        return part is not None and (msn, part) <= self.latest_part

    async def wait_for(self, ready, timeout: float) -> bool:
        """Wait until `ready()` holds (re-checked after every publish) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                return ready()
        return True

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()  # later waiters wait for the next publish
        changed.set()

    # -- pacer side
    def set_init(self, init: bytes) -> None:
        self.files = dict(self.files, **{self.init_name: init})

    def start_segment(self, msn: int, date: float) -> None:
        self._current = Segment(msn, f"llseg_{self.run}_{msn}.m4s", date)
        self._current_frames = 0

    def add_part(self, index: int, body: bytes, frames: int, independent: bool) -> None:
        segment = self._current
        name = f"llpart_{self.run}_{segment.msn}_{index}.m4s"
        segment.parts.append((name, frames / self.fps, independent))
        self._current_frames += frames
        self._publish({name: body}, latest_part=(segment.msn, index))

    def end_segment(self, body: bytes, frames: int) -> None:
        segment = self._current
        segment.duration = frames / self.fps
        self._segments.append(segment)
        while len(self._segments) > SEGMENTS + 1:  # one past the listed ones: a player a playlist behind
            self._segments.popleft()
        self._current = None
        self._publish({segment.name: body}, latest_segment=segment.msn)

    def _publish(self, new: dict[str, bytes], latest_part=None, latest_segment=None) -> None:
        files = dict(self.files, **new)
        # What a player may still ask for: the listed files, and one more segment's worth behind them.
        keep = {self.init_name, *self._kept_names()}
        self.files = {name: body for name, body in files.items() if name in keep}
        self.playlist = self._render().encode()
        if latest_part is not None:
            self.latest_part = latest_part
        if latest_segment is not None:
            self.latest_segment = latest_segment
        with self._lock:
            loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop closed (server stopping): nobody waits any more
                pass

    def _kept_names(self) -> list[str]:
        segments = list(self._segments)
        names = [s.name for s in segments]
        with_parts = segments[-(PARTS_FOR + 1):] + ([self._current] if self._current is not None else [])
        names += [name for s in with_parts for name, _, _ in s.parts]
        return names

    @property
    def in_segment(self) -> bool:
        """Whether a segment is being made (False before the first keyframe)."""
        return self._current is not None

    def next_part(self) -> tuple[int, int]:
        """(msn, part) of the part being made now (the preload hint): the next segment's first once
        the current segment holds a whole GOP (its next frame is a keyframe, which starts a segment)."""
        if self._current is None:
            return max(self.latest_segment + 1, self.first_msn), 0
        if self._current_frames >= self.gop_frames:
            return self._current.msn + 1, 0
        return self._current.msn, len(self._current.parts)

    def _render(self) -> str:
        target = max(1, math.ceil(max([s.duration for s in self._segments] or [1.0]) - 1e-9))
        lines = ["#EXTM3U", "#EXT-X-VERSION:6", f"#EXT-X-TARGETDURATION:{target}",
                 f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={3 * self.part_target:.3f}",
                 f"#EXT-X-PART-INF:PART-TARGET={self.part_target:.5f}", "#EXT-X-INDEPENDENT-SEGMENTS"]
        segments = list(self._segments)[-SEGMENTS:]
        first = segments[0].msn if segments else (self._current.msn if self._current else 0)
        lines.append(f"#EXT-X-MEDIA-SEQUENCE:{first}")
        if self.discontinuity and first > self.first_msn:  # the marked segment has left the window
            lines.append("#EXT-X-DISCONTINUITY-SEQUENCE:1")
        lines.append(f'#EXT-X-MAP:URI="{self.init_name}"')
        for i, segment in enumerate(segments):
            if self.discontinuity and segment.msn == self.first_msn:
                lines.append("#EXT-X-DISCONTINUITY")
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_iso(segment.date)}")
            if i >= len(segments) - PARTS_FOR:
                lines += [_part_line(*part) for part in segment.parts]
            lines += [f"#EXTINF:{segment.duration:.5f},", segment.name]
        if self._current is not None:
            if self.discontinuity and self._current.msn == self.first_msn:
                lines.append("#EXT-X-DISCONTINUITY")
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_iso(self._current.date)}")
            lines += [_part_line(*part) for part in self._current.parts]
        msn, part = self.next_part()
        lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="llpart_{self.run}_{msn}_{part}.m4s"')
        return "\n".join(lines) + "\n"


def _part_line(name: str, seconds: float, independent: bool) -> str:
    return f'#EXT-X-PART:DURATION={seconds:.5f},URI="{name}"' + (",INDEPENDENT=YES" if independent else "")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LlHlsPackager:
    """The LL-HLS output on the pacer thread: an fMP4 follower of `leader` (no second encode) whose
    per-frame fragments it groups into parts of `part_frames` frames and segments cut at keyframes."""

    name = "llhls"

    def __init__(self, window: LlHlsWindow, fps: int, width: int, height: int, leader: _H264Output,
                 clock=time.time):
        self.window, self.clock = window, clock
        self._msn = window.first_msn
        self._parts: list[bytes] = []  # the current segment's finished parts
        self._fragments: list[bytes] = []  # the current part's fragments
        self._segment_frames = 0
        self._frame_times: deque[float] = deque()  # wall time of each frame muxed, until its fragment leaves
        self._muxer = Fmp4Encoder(self, fps, width, height, leader=leader)  # `self` stands in for its Broadcast

    # The Fmp4Encoder's Broadcast interface: `header` (the init segment) and publish(fragment, keyframe).
    @property
    def header(self) -> bytes:
        return self.window.files.get(self.window.init_name, b"")

    @header.setter
    def header(self, init: bytes) -> None:
        self.window.set_init(init)

    def publish(self, fragment: bytes, keyframe: bool = False) -> None:
        frame_time = self._frame_times.popleft() if self._frame_times else self.clock()
        if keyframe:
            if self.window.in_segment:
                self._end_segment()
            self.window.start_segment(self._msn, frame_time)
        elif not self.window.in_segment:
            return  # nothing before the first keyframe can be decoded
        self._fragments.append(fragment)
        self._segment_frames += 1
        if len(self._fragments) == self.window.part_frames:
            self._end_part()

    def _end_part(self) -> None:
        body = b"".join(self._fragments)
        self._fragments.clear()
        self.window.add_part(len(self._parts), body, body_frames(body), independent=not self._parts)
        self._parts.append(body)

    def _end_segment(self) -> None:
        if self._fragments:  # a short last part (the keyframe came early)
            self._end_part()
        self.window.end_segment(b"".join(self._parts), self._segment_frames)
        self._parts.clear()
        self._segment_frames = 0
        self._msn += 1

    # -- the pacer's encoder interface
    def encode(self, frame, repeated: bool = False) -> None:
        self._frame_times.append(self.clock())
        self._muxer.encode(frame, repeated)  # raises what failed in this follower's muxing

    def close(self) -> None:
        self._muxer.close()


def body_frames(body: bytes) -> int:
    """Frames in a run of fragments: one fragment (moof) per frame (frag_every_frame)."""
    count, i = 0, 0
    while i + 8 <= len(body):
        size = int.from_bytes(body[i:i + 4], "big")
        count += body[i + 4:i + 8] == b"moof"
        i += max(size, 8)
    return count


def check_part_length(part_s: float) -> None:
    """Refuse a part length no player can use (checked before the stream's fps is known)."""
    if not 0.1 <= part_s <= 1.0:
        raise ValueError(f"an LL-HLS part should last 0.1-1 s (0.2-0.5 s is usual), got {part_s:g}")


def new_window(fps: int, part_s: float = PART_TARGET_S, run: str | None = None, first_msn: int = 0,
               discontinuity: bool = False) -> LlHlsWindow:
    """A window whose parts are whole frames, as close to `part_s` seconds as the frame rate allows
    (first_msn, discontinuity: a restarted server's, see LlHlsWindow)."""
    check_part_length(part_s)
    return LlHlsWindow(fps, max(1, round(fps * part_s)), run or secrets.token_hex(4), first_msn, discontinuity)


def add_routes(app, window: LlHlsWindow) -> None:
    """GET /llhls/live.m3u8 (blocking reload) and /llhls/<part, segment or init> (a part not made
    yet but next in line, as the preload hint names it, is waited for)."""
    from aiohttp import web

    def error(status: int, message: str):
        return web.json_response({"error": message}, status=status)

    def answer(name: str, body: bytes, cache: str):
        return web.Response(body=body, content_type=CONTENT_TYPES[name.rsplit(".", 1)[1]],
                            headers={"Cache-Control": cache})

    async def playlist(request):
        window.bind(asyncio.get_running_loop())
        try:
            msn = _query_int(request, "_HLS_msn")
            part = _query_int(request, "_HLS_part")
        except ValueError as err:
            return error(400, str(err))
        if part is not None and msn is None:
            return error(400, "_HLS_part needs _HLS_msn (the segment the part belongs to)")
        if msn is not None:
            if msn > window.latest_segment + 2:
                return error(400, f"_HLS_msn={msn} is more than two segments past the live edge "
                                  f"({window.latest_segment}); reload the playlist without it")
            await window.wait_for(lambda: window.has(msn, part), BLOCK_TIMEOUT_S)
        if window.playlist is None:
            return error(404, "no LL-HLS playlist yet: the stream has not produced its first part")
        return answer(PLAYLIST, window.playlist, "no-cache")

    async def file(request):
        window.bind(asyncio.get_running_loop())
        name = request.match_info["name"]
        body = window.files.get(name)
        if body is None:
            wanted = _PART_NAME.match(name)
            if wanted and wanted.group(1) == window.run:
                msn, part = int(wanted.group(2)), int(wanted.group(3))
                if (msn, part) <= window.next_part() or msn <= window.latest_segment + 1:
                    await window.wait_for(lambda: name in window.files or window.has(msn + 1, 0), BLOCK_TIMEOUT_S)
                    body = window.files.get(name)
        if body is None:
            return error(404, f"{name} is not there (yet, or it rolled out of the window); reload the playlist")
        return answer(name, body, "public, max-age=31536000, immutable")

    app.router.add_get("/llhls/" + PLAYLIST, playlist)
    app.router.add_get("/llhls/{name:[A-Za-z0-9_]{1,80}\\.(?:m4s|mp4)}", file)


def _query_int(request, key: str) -> int | None:
    value = request.query.get(key)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 12:
        raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return int(value)
