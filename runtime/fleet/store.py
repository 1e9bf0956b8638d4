"""The fleet's state on disk (no Ray here): every stream's config, token, control state (prompt,
playlist and its position, the HTTP /settings layer) and restart count, in one JSON file per fleet under `state_dir`.

The controller is its only writer. The file is replaced atomically (temp file, fsync, rename:
runtime/atomic_file.py's `write_atomically`) and created readable by its owner only, since it holds tokens. It is
what makes a fleet's streams outlive `skyrt fleet down` + `up`, a restarted controller, and a stream
restarted on another node.

Beside it, `<fleet>.snapshots/<stream id>.stream.npz` holds each stream's own snapshot (the stream state
runtime/snapshot.py writes, as `skyrt serve --state` does), written by the stream's generator on the
node it runs on: a stream restarted on the same node, or on any node when state_dir is shared storage,
continues where its snapshot stood.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic_file import write_atomically
from .config import StreamConfig

log = logging.getLogger("skyrt.fleet")

STORE_VERSION = 1


@dataclass
class StreamRecord:
    """What the fleet keeps about one stream."""

    config: StreamConfig
    token: str | None = None  # resolved at `up`/`add`: the stream's own token or the fleet's
    control: dict | None = None  # the stream's last StreamHost.control_snapshot() (board + settings layer)
    control_source: str = ""  # config.control_source_hash() of the declaration `control` grew from
    starts: int = 0  # actor incarnations since the stream was created (restarts = starts - 1)
    last_node: dict | None = None  # where its latest incarnation started

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def to_json(self) -> dict:
        return {"config": self.config.to_json(), "token": self.token, "control": self.control,
                "control_source": self.control_source, "starts": self.starts, "last_node": self.last_node}

    @classmethod
    def from_json(cls, data: dict) -> "StreamRecord":
        return cls(config=StreamConfig.from_json(data["config"]), token=data.get("token"),
                   control=data.get("control"), control_source=data.get("control_source", ""),
                   starts=int(data.get("starts", 0)), last_node=data.get("last_node"))


@dataclass
class FleetState:
    streams: dict[str, StreamRecord] = field(default_factory=dict)
    token: str | None = None  # the fleet-wide token (a generated one is kept so that `up` again reuses it)


class FleetStore:
    """Load and save one fleet's state file."""

    def __init__(self, state_dir: str | Path, fleet: str):
        self.path = Path(state_dir).expanduser() / f"{fleet}.json"
        self.snapshot_dir = self.path.with_name(f"{fleet}.snapshots")
        self.saves = 0

    def forget_snapshot(self, stream_id: str) -> None:
        """A removed stream's snapshot goes with it (a stream added later under its id starts fresh)."""
        stream_snapshot_path(self.snapshot_dir, stream_id).unlink(missing_ok=True)

    def load(self) -> FleetState:
        """The saved state; an empty one if there is none. A file that is not a fleet state is named
        in an error (never silently replaced: it holds the operator's streams)."""
        if not self.path.exists():
            return FleetState()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("version") != STORE_VERSION:
                raise ValueError(f"not a version {STORE_VERSION} skyrt fleet state")
            streams = {sid: StreamRecord.from_json(rec) for sid, rec in data.get("streams", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"fleet state {self.path} is unreadable ({err}); move it away to start the fleet "
                             f"from its config alone") from err
        return FleetState(streams=streams, token=data.get("token"))

    def save(self, state: FleetState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": STORE_VERSION, "token": state.token,
                "streams": {sid: rec.to_json() for sid, rec in state.streams.items()}}
        write_atomically(self.path, json.dumps(data, indent=1).encode())
        self.saves += 1


def stream_snapshot_path(snapshot_dir: str | Path, stream_id: str) -> Path:
    """Where stream `stream_id` keeps its stream snapshot (runtime/snapshot.py's format)."""
    return Path(snapshot_dir) / f"{stream_id}.stream.npz"


def merge_declared(state: FleetState, declared: StreamConfig, token: str | None) -> tuple[StreamRecord, bool]:
    """The record for a stream the config declares, and whether its actor must be (re)created.

    A saved control state survives unless the declaration it grew from changed (the operator edited
    the stream's prompt or playlist in the file: the file wins). A changed config restarts the stream."""
    record = state.streams.get(declared.id)
    source = declared.control_source_hash()
    if record is None:
        return StreamRecord(declared, token, None, source), True
    changed = record.config != declared or record.token != token
    if record.control_source != source:
        record.control, record.control_source = None, source
    record.config, record.token = declared, token
    return record, changed
