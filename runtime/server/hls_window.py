"""The HLS output's live files in memory: published once per segment by the encoder (pacer thread),
served by the HTTP side (event loop) with no disk access and no per-request work beyond a lookup.

FFmpeg's HLS muxer writes a finished segment and the new playlist while it muxes the keyframe that
opens the next segment (segments are cut at keyframes), so right after that packet the folder holds
a consistent window. `refresh()` then reads the playlist and any file it lists that is not in memory
yet, and replaces the whole mapping at once: a reader sees one window or the next, never a mix.

app.py answers a request for one of them with its bytes, from memory: a dictionary lookup, no disk.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PLAYLIST = "live.m3u8"
CONTENT_TYPES = {"m3u8": "application/vnd.apple.mpegurl", "m4s": "video/iso.segment", "mp4": "video/mp4"}
# The playlist changes every segment; segment and init names are new in every run (encoders.py), so
# their bytes never change and any cache in front may keep them.
CACHE_CONTROL = {"m3u8": "no-cache", "m4s": "public, max-age=31536000, immutable",
                 "mp4": "public, max-age=31536000, immutable"}
_LISTED = re.compile(r'^#EXT-X-MAP:URI="([^"]+)"|^([^#\s][^\s]*)$', re.M)


@dataclass(frozen=True)
class HlsFile:
    """One file of the window: its bytes and the headers of a 200 answer for them."""

    body: bytes
    content_type: str
    cache_control: str

    @classmethod
    def of(cls, name: str, body: bytes) -> "HlsFile":
        kind = name.rsplit(".", 1)[1]
        return cls(body, CONTENT_TYPES[kind], CACHE_CONTROL[kind])


class HlsWindow:
    """The playlist and the files it lists (plus the previous window's, for players a segment behind)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files: dict[str, HlsFile] = {}  # replaced whole by refresh(), never changed in place
        self._playlist: bytes | None = None
        self._listed_before: set[str] = set()
        self.refreshes = 0  # windows published (for tests and metrics)
        self.requests = RequestCounts()

    def get(self, name: str) -> HlsFile | None:
        """The current version of `name` (counted as a request for it), or None if the window does
        not hold it (the HTTP side's thread)."""
        file = self._files.get(name)
        if file is not None:
            self.requests.count(name, file, self._files)
        return file

    def names(self) -> list[str]:
        return list(self._files)

    def refresh(self) -> bool:
        """Publish the folder's current window if its playlist changed; True if it did (pacer thread)."""
        playlist = self._read(PLAYLIST)
        if playlist is None or playlist == self._playlist:
            return False
        listed = [a or b for a, b in _LISTED.findall(playlist.decode("utf-8", "replace"))]
        previous = self._files
        files = {PLAYLIST: HlsFile.of(PLAYLIST, playlist)}
        for name in listed:
            file = previous.get(name) or self._load(name)
            if file is not None:
                files[name] = file
        # What the previous playlist listed stays one more window: a player that loaded it may still ask.
        for name in self._listed_before - files.keys():
            if name in previous:
                files[name] = previous[name]
        self._listed_before = set(listed)
        self._files = files
        # A listed file not on disk yet (never seen with FFmpeg, which writes files before the playlist
        # naming them): leave the playlist unrecorded so the next refresh tries again.
        self._playlist = playlist if all(name in files for name in listed) else None
        self.refreshes += 1
        return True

    def _load(self, name: str) -> HlsFile | None:
        if name.rsplit(".", 1)[-1] not in CONTENT_TYPES:
            return None
        body = self._read(name)
        return None if body is None else HlsFile.of(name, body)

    def _read(self, name: str) -> bytes | None:
        if "/" in name or not name or name.startswith("."):
            return None  # the playlist lists bare names in this folder; anything else is not ours
        try:
            return (self.folder / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None


KINDS = {"m3u8": "playlist", "m4s": "segment", "mp4": "init"}


class RequestCounts:
    """HLS answers this origin gave, per kind of file, and how many distinct file versions they were
    for (each playlist a segment publishes is a version of live.m3u8): requests / files is what a
    cache in front (deploy/nginx/skyrt.conf) is judged by, about 1 when a crowd reaches the origin
    once per file. Updated on the HTTP side's thread only."""

    def __init__(self):
        self.requests = dict.fromkeys(KINDS.values(), 0)
        self.files = dict.fromkeys(KINDS.values(), 0)
        self._seen: set[tuple[str, int]] = set()  # (name, hash of its bytes) of the versions asked

    def count(self, name: str, file: HlsFile, window: dict[str, HlsFile]) -> None:
        kind = KINDS[name.rsplit(".", 1)[1]]
        self.requests[kind] += 1
        key = (name, hash(file.body))  # a bytes object computes its hash once
        if key not in self._seen:
            self._seen.add(key)
            self.files[kind] += 1
            if len(self._seen) > 4 * len(window) + 64:  # forget versions the window no longer holds
                self._seen = {(n, h) for n, h in self._seen if n in window and hash(window[n].body) == h}

    def snapshot(self) -> dict:
        return {kind: {"requests": self.requests[kind], "files": self.files[kind]} for kind in self.requests}

    def prometheus(self) -> str:
        lines = ["# HELP skyrt_hls_requests_total HLS files answered by this server, per kind.",
                 "# TYPE skyrt_hls_requests_total counter"]
        lines += [f'skyrt_hls_requests_total{{kind="{k}"}} {n}' for k, n in self.requests.items()]
        lines += ["# HELP skyrt_hls_files_requested_total Distinct HLS file versions asked at least once.",
                  "# TYPE skyrt_hls_files_requested_total counter"]
        lines += [f'skyrt_hls_files_requested_total{{kind="{k}"}} {n}' for k, n in self.files.items()]
        return "\n".join(lines) + "\n"

