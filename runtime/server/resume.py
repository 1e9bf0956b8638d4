"""Snapshot and resume of the served stream, on the generator child's side (generator_process.py).

With `--state FILE`, the child keeps a snapshot of its stream at `FILE.stream.npz` (runtime/snapshot.py:
rollout core, noise generator, prompt contexts, streaming-decoder caches, the block count, and what the
server process adds: the playlist position and HLS media sequences, `server`), written between chunks
every `--snapshot-every` seconds (default 30; 0: only at SIGTERM) and when the server stops. When the
next stream starts (after a restart, even after SIGKILL) the child reads it back, checked against this
run's model, settings and skyrt version: the stream then continues where the snapshot stood, the same
blocks an uninterrupted stream gives from there. A snapshot that does not fit (corrupt, truncated,
another model or settings, a symlink) is refused with one log line that names the reason, and the
stream starts fresh; so is a snapshot whose import fails at the first chunk.

Chunks the child made after the last snapshot and before a crash are made again after the restart
(the stream goes back to the snapshot, up to --snapshot-every seconds); the server marks the splice as
an HLS discontinuity.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from ..snapshot import Snapshot, SnapshotRefused, model_identity, read_snapshot, write_snapshot

log = logging.getLogger("skyrt.server")

SNAPSHOT_SUFFIX = ".stream.npz"
DEFAULT_EVERY_S = 30.0
# Settings that may change across a restart without breaking a resume: the prompt is part of the state.
NOT_SETTINGS = ("prompt", "negative_prompt")


def snapshot_path(state_path: str | Path) -> Path:
    """Where the stream snapshot of `--state FILE` lives: FILE.stream.npz beside it."""
    state_path = Path(state_path)
    return state_path.with_name(state_path.name + SNAPSHOT_SUFFIX)


def request_settings(request) -> dict:
    """The resolved request's settings a snapshot must have been taken with (all but the prompts)."""
    return {k: v for k, v in dataclasses.asdict(request).items() if k not in NOT_SETTINGS}


class StreamSnapshots:
    """The child's snapshots of its one stream: `load` at stream start, `write_if_due` between chunks,
    `write` when asked (the server stopping). Never raises into the stream: a failed write is logged."""

    def __init__(self, path: str | Path, every_s: float, model: str | None):
        self.path, self.every_s, self.model = Path(path), float(every_s), model
        self._identity: str | None = None
        self._last = time.monotonic()
        self.server_state: dict = {}  # the server process's part (playlist position, HLS sequences)
        self.writes = 0
        self.last_size: int | None = None
        self.refused_once = False  # a snapshot whose import failed is not tried again by this process
        self.last_refusal: str | None = None  # why the last snapshot was refused (the parent counts them)

    @property
    def identity(self) -> str:
        if self._identity is None:  # hashing the model's files once, when the first snapshot needs it
            self._identity = model_identity(self.model)
        return self._identity

    def load(self, request) -> Snapshot | None:
        """The snapshot to resume `request`'s stream from, or None (none there, or refused: logged)."""
        if self.refused_once or request.mode != "kvcache" or not (self.path.exists() or self.path.is_symlink()):
            return None
        try:
            snapshot = read_snapshot(self.path, request_settings(request), self.identity)
        except SnapshotRefused as err:
            log.warning("not resuming: %s; the stream starts fresh", err)
            self.last_refusal = str(err)
            return None
        log.info("resuming the stream from snapshot %s (block %s)", self.path, snapshot.state.get("blocks"))
        return snapshot

    def refuse(self, error: Exception) -> None:
        """The snapshot could not be put into the stream: say so; this process starts fresh from now on."""
        self.refused_once = True
        self.last_refusal = f"snapshot {self.path} does not fit this stream ({error})"
        log.warning("not resuming: snapshot %s does not fit this stream (%s); the stream starts fresh",
                    self.path, error)

    def write_if_due(self, stream, request) -> None:
        if request.mode != "kvcache":
            return  # window mode has no resumable state (one warning at a stop is enough)
        if self.every_s > 0 and time.monotonic() - self._last >= self.every_s:
            self.write(stream, request)

    def write(self, stream, request) -> bool:
        """Snapshot `stream` now (between chunks); False (logged) when it cannot be."""
        self._last = time.monotonic()
        try:
            state, arrays = stream.export_state()
            state["server"] = dict(self.server_state)
            self.last_size = write_snapshot(self.path, state, arrays, request_settings(request), self.identity)
        except (OSError, ValueError, NotImplementedError) as err:
            log.warning("could not write the stream snapshot %s: %s", self.path, err)
            return False
        self.writes += 1
        log.debug("stream snapshot %s: block %s, %d bytes", self.path, state.get("blocks"), self.last_size)
        return True


__all__ = ["DEFAULT_EVERY_S", "SNAPSHOT_SUFFIX", "StreamSnapshots", "request_settings", "snapshot_path"]
