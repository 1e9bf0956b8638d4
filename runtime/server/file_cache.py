"""The HLS folder's files as bytes in memory, read once per version, so that a viewer's request
costs a stat and a socket write, not a disk read.

FFmpeg's HLS muxer (with `temp_file`) writes every playlist and segment under a temporary name and
renames it into place, so a name's content only ever changes as a whole, together with its inode
and mtime: (inode, mtime, size) identifies one version.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path


class FileCache:
    """Recently served files of one folder (names only, no paths), at most `max_files` of them."""

    def __init__(self, folder: Path, max_files: int = 32):
        self.folder, self.max_files = Path(folder), max_files
        self._lock = threading.Lock()
        self._files: OrderedDict[str, tuple[tuple, bytes]] = OrderedDict()
        self.reads = 0  # disk reads (misses), for tests and metrics

    def _version(self, name: str) -> tuple | None:
        try:
            st = os.stat(self.folder / name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def get(self, name: str) -> bytes | None:
        """The file's bytes if the cached copy is its current version, else None (call `read`)."""
        with self._lock:
            cached = self._files.get(name)
        if cached is not None and cached[0] == self._version(name):
            return cached[1]
        return None

    def read(self, name: str) -> bytes | None:
        """Read the file's current version into the cache (any thread); None if it is not there."""
        try:
            with open(self.folder / name, "rb") as f:
                st = os.fstat(f.fileno())  # the version of exactly the bytes read
                data = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        with self._lock:
            self.reads += 1
            self._files[name] = ((st.st_ino, st.st_mtime_ns, st.st_size), data)
            self._files.move_to_end(name)
            while len(self._files) > self.max_files:
                self._files.popitem(last=False)
        return data
