"""What must outlive the process: the control state (`--state FILE`) and the HLS folder's owner.

A server killed with SIGKILL runs no cleanup. Two things then matter:

- Control state: the playlist an operator PUT, the manual prompt, the schedule and the HTTP settings are
  written to `--state FILE` on every change (temp file in the same folder, fsync, rename, fsync of the
  folder), so the file on disk is always one whole state, never half of one; a restart with the same
  `--state` resumes.
- HLS folders: each is named after its owner's pid and records the owner's start time, so a server
  starting up can tell a dead owner's folder (remove it) from a live one's (leave it).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

from ..atomic_file import write_atomically

from .playlist import PromptBoard, RequestError

log = logging.getLogger("skyrt.server")

HLS_PREFIX = "skyrt-hls-"
OWNER_FILE = "owner.json"
STATE_VERSION = 1


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if no such process. With the
    pid it names one process for good: a reused pid has a later start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name (field 2) may hold spaces; fields after its closing ')' are plain
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(folder: Path) -> bool:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        pid, started = int(owner["pid"]), str(owner["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        # No readable owner yet: a folder being made right now (between mkdtemp and the owner file: two
        # servers starting at once, as a fleet's streams on one GPU worker do), or one a crash left half
        # made. The pid in its name tells them apart: a live one is still making it.
        pid = folder.name[len(HLS_PREFIX):].split("-", 1)[0]
        return pid.isdigit() and _process_start_time(int(pid)) is not None
    return _process_start_time(pid) == started


def reap_stale_hls_folders(parent: Path | None = None) -> list[Path]:
    """Remove `skyrt-hls-*` folders under `parent` (the temp folder) whose owner process is gone."""
    parent = Path(parent or tempfile.gettempdir())
    removed = []
    for folder in parent.glob(HLS_PREFIX + "*"):
        if folder.is_dir() and not folder.is_symlink() and not _owner_alive(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d HLS folder(s) left by servers that died: %s", len(removed),
                 ", ".join(str(p) for p in removed))
    return removed


def make_hls_folder(parent: Path | None = None) -> Path:
    """A new HLS folder owned by this process (stale ones of dead processes are reaped first)."""
    reap_stale_hls_folders(parent)
    folder = Path(tempfile.mkdtemp(prefix=f"{HLS_PREFIX}{os.getpid()}-", dir=parent))
    (folder / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(),
                                                 "start_time": _process_start_time(os.getpid())}))
    return folder


class StateFile:
    """The board's control state in a JSON file: `save` after each change, `restore` at start."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.saves = 0
        # Other owners' state saved beside the board's, by key: the HTTP settings (settings_control.py).
        self.sections: dict[str, Callable[[], object]] = {}

    def save(self, board: PromptBoard) -> None:
        """Write the board's state now (any thread; writes are serialized)."""
        with self._lock:
            state = {"version": STATE_VERSION, **board.snapshot(), **{k: get() for k, get in self.sections.items()}}
            write_atomically(self.path, json.dumps(state, indent=1).encode())
            self.saves += 1

    def load(self) -> dict | None:
        """The saved state, or None if there is none yet. A file that is not a state is reported and
        skipped (the server starts from its flags and the next save replaces it)."""
        if not self.path.exists():
            return None
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                raise ValueError(f"not a version {STATE_VERSION} skyrt state")
            return state
        except (OSError, ValueError, UnicodeDecodeError) as err:
            log.warning("ignoring state file %s (%s); starting from the command line's prompt and playlist",
                        self.path, err)
            return None

    def restore(self, board: PromptBoard, limits) -> bool:
        """Put the saved prompt and playlist back on `board`; False if there was nothing to restore."""
        state = self.load()
        if state is None:
            return False
        try:
            board.restore(state, limits)
        except RequestError as err:
            log.warning("ignoring state file %s: %s", self.path, err)
            return False
        log.info("resumed the prompt and playlist saved in %s", self.path)
        return True


class StateSaver(threading.Thread):
    """Saves the board in the background when asked (`mark_dirty`), so the pacer thread, which
    switches playlist items, never waits on a disk."""

    def __init__(self, state: StateFile, board: PromptBoard):
        super().__init__(name="skyrt-state", daemon=True)
        self.state, self.board = state, board
        self._dirty = threading.Event()
        # Not `_stop`: threading.Thread has a method of that name, which join() calls; shadowing it
        # made every join (the stop at SIGTERM) raise, so the last save never happened.
        self._stopping = threading.Event()

    def mark_dirty(self) -> None:
        self._dirty.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            if self._dirty.wait(0.5):
                self._dirty.clear()
                self._save()

    def _save(self) -> None:
        try:
            self.state.save(self.board)
        except OSError as err:  # a full disk must not stop the stream
            log.warning("could not save state to %s: %s", self.state.path, err)

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)
        self._save()  # the last position
