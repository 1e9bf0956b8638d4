"""Output encoders: each runs once per output format (never once per client) on the pacer thread.

    MjpegEncoder  uint8 frame -> a multipart JPEG part per new frame -> Broadcast ("mjpeg")
    Fmp4Encoder   H.264 in fragmented MP4, one fragment a frame  -> Broadcast ("mp4"), init segment as header
    HlsEncoder    H.264 in 1 s fMP4 segments + rolling playlist  -> a folder, published to an HlsWindow per segment

H.264 is encoded once per frame whatever the number of H.264 outputs: the first one's libx264 encodes,
and an output made with `leader=` muxes copies of the leader's packets (same bytes, same frames).

H.264 settings are the ones measured to play in Chromium/hls.js at ~1.5 s behind live (PyAV 18 / FFmpeg 8):
libx264 veryfast, zerolatency, no B-frames, one keyframe a second, no scene-cut keyframes.
"""
from __future__ import annotations

import io
import secrets
import shutil
import struct
import time
from collections import deque
from pathlib import Path

import numpy as np

from .broadcast import Broadcast
from .hls_window import PLAYLIST, HlsWindow


def h264_options(fps: int) -> dict[str, str]:
    """libx264 options for live output: one GOP per second, frames leave the encoder at once."""
    return {"preset": "veryfast", "tune": "zerolatency", "bf": "0", "g": str(fps), "sc_threshold": "0"}


def _add_h264_stream(container, fps: int, width: int, height: int):
    if width % 2 or height % 2:
        raise ValueError(f"H.264 needs an even frame size, got {width}x{height}")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = h264_options(fps)
    return stream


class _H264Output:
    """A container with one H.264 stream that either encodes (a leader: its own libx264) or muxes
    copies of a leader's packets (a follower, `leader=`): one encode per frame for every H.264 output.

    A follower's stream copies the leader's codec parameters, SPS/PPS included, which exist only once
    the leader has muxed its first packet; so it is made then, and the leader muxes its own copy first."""

    def __init__(self, container, fps: int, width: int, height: int, leader: "_H264Output | None" = None):
        self._container = container
        self._followers: list[_H264Output] = []
        self._leader = leader
        self._follower_error: BaseException | None = None  # raised from this follower's own encode()
        if leader is None:
            self._stream = _add_h264_stream(container, fps, width, height)
        else:
            if leader._leader is not None:
                raise ValueError("an H.264 output can follow only an output that encodes")
            self._stream = None
            leader._followers.append(self)

    @property
    def encodes(self) -> bool:
        """Whether this output runs its own encoder (False: it muxes its leader's packets)."""
        return self._leader is None

    def _mux(self, packet) -> None:
        self._container.mux(packet)

    def encode(self, frame: np.ndarray, repeated: bool = False) -> None:
        if self._leader is not None:  # the leader encoded this frame for it; report what failed there
            error, self._follower_error = self._follower_error, None
            if error is not None:
                raise error
            return
        import av

        for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            if not self._followers:
                self._mux(packet)
                continue
            copy = (bytes(packet), packet.pts, packet.dts, packet.time_base, packet.is_keyframe)
            self._mux(packet)  # muxing hands the packet's data to FFmpeg: copy first
            for follower in self._followers:
                follower._mux_copy(copy, self._stream)

    def _mux_copy(self, copy: tuple, template) -> None:
        import av

        try:
            if self._stream is None:
                self._stream = self._container.add_stream_from_template(template)
            packet = av.Packet(copy[0])
            packet.pts, packet.dts, packet.time_base, packet.is_keyframe = copy[1:]
            packet.stream = self._stream
            self._mux(packet)
        except Exception as err:  # one broken output must not take the leader down
            self._follower_error = err

    def close(self) -> None:
        try:
            self._container.close()
        except Exception:  # closing a broken muxer must not hide the error that broke it
            pass


MJPEG_BOUNDARY = "skyrtframe"
MJPEG_KEEPALIVE_S = 1.0  # with no new frame for this long, the last part is sent again


class MjpegEncoder:
    """One JPEG per NEW frame (Pillow; ~1 ms at 256x256), published as a whole multipart part.

    An MJPEG client shows each part as it arrives and has no clock, so a frame the pacer repeats
    carries nothing: it is neither encoded nor sent, except the last part once a second, so players
    and proxies see a live connection while the generator is slow or restarting. Each part (boundary,
    headers, JPEG) is built once here and written as-is to every viewer."""

    name = "mjpeg"

    def __init__(self, broadcast: Broadcast, quality: int = 85, clock=time.monotonic):
        self.broadcast, self.quality, self.clock = broadcast, quality, clock
        self._last_part: bytes | None = None
        self._last_sent = 0.0

    def encode(self, frame: np.ndarray, repeated: bool = False) -> None:
        now = self.clock()
        if repeated and self._last_part is not None:
            if now - self._last_sent >= MJPEG_KEEPALIVE_S:
                self.broadcast.publish(self._last_part)
                self._last_sent = now
            return
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=self.quality)
        self._last_part = multipart_part(buf.getvalue())
        self.broadcast.publish(self._last_part)
        self._last_sent = now

    def close(self) -> None:
        pass


def multipart_part(jpeg: bytes) -> bytes:
    """One part of a multipart/x-mixed-replace stream carrying `jpeg`."""
    head = f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
    return head.encode() + jpeg + b"\r\n"


def jpeg_of_part(part: bytes) -> bytes:
    """The JPEG inside a `multipart_part`."""
    head, _, rest = part.partition(b"\r\n\r\n")
    return rest[:-2]


class _BoxSplitter(io.RawIOBase):
    """A write-only file that cuts the muxer's byte stream into top-level MP4 boxes: everything
    before the first `moof` is the init segment (ftyp + moov); each `moof` + `mdat` is one fragment."""

    def __init__(self, on_init, on_fragment):
        super().__init__()
        self._buf = bytearray()
        self._init = bytearray()
        self._fragment = bytearray()
        self._init_done = False
        self._on_init, self._on_fragment = on_init, on_fragment

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._buf += data
        while len(self._buf) >= 8:
            size, kind = struct.unpack(">I4s", self._buf[:8])
            if size == 1:  # 64-bit size follows the type
                if len(self._buf) < 16:
                    break
                size = struct.unpack(">Q", self._buf[8:16])[0]
            if size < 8 or len(self._buf) < size:
                break
            box = bytes(self._buf[:size])
            del self._buf[:size]
            self._box(kind, box)
        return len(data)

    def _box(self, kind: bytes, box: bytes) -> None:
        if kind == b"moof" and not self._init_done:
            self._init_done = True
            self._on_init(bytes(self._init))
        if not self._init_done:
            self._init += box
            return
        self._fragment += box
        if kind == b"mdat":  # moof + mdat complete: one frame
            self._on_fragment(bytes(self._fragment))
            self._fragment.clear()


# A fragment per frame from an empty moov. skip_trailer: FFmpeg's mp4 muxer otherwise keeps an index
# entry (40 bytes) per fragment for the mfra box it writes at the end, which a live stream never
# reaches: 2 fMP4 muxers (mp4, LL-HLS) at 24 fps grew the server by ~6.5 MiB an hour (issue 36 soak).
MOVFLAGS = "frag_every_frame+empty_moov+default_base_moof+skip_trailer"


class Fmp4Encoder(_H264Output):
    """H.264 in fragmented MP4 with a fragment per frame, for low-latency players (mpv, VLC, ffplay).

    The muxer emits a frame's fragment when the next frame arrives, so output lags one frame."""

    name = "mp4"

    def __init__(self, broadcast: Broadcast, fps: int, width: int, height: int, leader: _H264Output | None = None):
        import av

        self.broadcast = broadcast
        self._keyframes: deque[bool] = deque()
        self._sink = _BoxSplitter(self._set_header, self._publish)
        container = av.open(self._sink, mode="w", format="mp4",
                            options={"movflags": MOVFLAGS})
        super().__init__(container, fps, width, height, leader)

    def _set_header(self, init: bytes) -> None:
        self.broadcast.header = init

    def _publish(self, fragment: bytes) -> None:
        self.broadcast.publish(fragment, keyframe=self._keyframes.popleft() if self._keyframes else False)

    def _mux(self, packet) -> None:
        self._keyframes.append(bool(packet.is_keyframe))  # read back when the fragment leaves the muxer
        self._container.mux(packet)


class HlsEncoder(_H264Output):
    """H.264 HLS: `live.m3u8` plus 1 s fMP4 segments in `folder` (named per run), a rolling window of
    `list_size` segments with program-date-time; old segments are deleted as the window rolls. After
    every segment the folder's window is published to `window` (served from memory, hls_window.py)."""

    name = "hls"
    PLAYLIST = PLAYLIST

    def __init__(self, folder: Path, fps: int, width: int, height: int, segment_s: int = 1, list_size: int = 6,
                 run: str | None = None, leader: _H264Output | None = None, window: HlsWindow | None = None,
                 restarted: bool = False):
        import av

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.window = window if window is not None else HlsWindow(self.folder)
        # Every run names its init segment and segments anew (seg_<run>_000001.m4s), so a name means
        # the same bytes forever and caches (a CDN, a proxy, the browser) may keep them.
        self.run = run or secrets.token_hex(4)
        container = av.open(str(self.folder / self.PLAYLIST), mode="w", format="hls", options={
            "hls_time": str(segment_s), "hls_list_size": str(list_size), "hls_segment_type": "fmp4",
            # temp_file: players never read a half-written playlist or segment
            "hls_flags": "delete_segments+program_date_time+independent_segments+temp_file"
                         + ("+discont_start" if restarted else ""),
            "hls_fmp4_init_filename": f"init_{self.run}.mp4",
            "hls_segment_filename": str(self.folder / f"seg_{self.run}_%06d.m4s"),
            # restarted (--state): numbered from the wall clock, on from the run before, first segment marked
            # as a discontinuity (EXT-X-DISCONTINUITY)
            **({"hls_start_number_source": "epoch"} if restarted else {}),
        })
        super().__init__(container, fps, width, height, leader)

    def _mux(self, packet) -> None:
        keyframe = packet.is_keyframe
        self._container.mux(packet)
        if keyframe:  # taking a keyframe, the muxer closed the last segment and rewrote the playlist
            self.window.refresh()

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.folder, ignore_errors=True)
