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

    def get(self, name: str) -> HlsFile | None:
        """The current version of `name`, or None if the window does not hold it (any thread)."""
        return self._files.get(name)

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
