"""Stream snapshots: one file that holds everything a restarted stream needs to continue exactly.

Format: a numpy .npz (uncompressed zip of .npy arrays; read with allow_pickle=False, so a file can
never run code) whose array "__header__" is UTF-8 JSON (uint8 [n]):
    format            SNAPSHOT_FORMAT; another is refused
    skyrt             the skyrt version that wrote it (_core.build_info()); another is refused
    model             model_identity() of the model that wrote it; another is refused
    settings          the resolved stream settings (JSON); any difference is refused, naming the field
    arrays_sha256     sha256 over every other array (name, dtype, shape, bytes, sorted by name)
    state             the stream's own header (noise generator, loop position, prompts, server extras)
The arrays: the rollout core's state ("core/..."), the prompt contexts ("context/i"), the streaming
decoder's caches ("decoder/..."), as runtime/kvcache.py and runtime/pipeline.py export them.

Writing is atomic (a temp file in the same folder, fsync, rename, fsync of the folder): a crash at any
point leaves the previous snapshot or the new one. Reading opens with O_NOFOLLOW (a symlink planted at
the path is refused, not followed) and checks everything above before a single array is used; any
failure is a SnapshotRefused whose message says what is wrong, and the caller starts fresh.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skyrt import _core

from .atomic_file import write_atomically

SNAPSHOT_FORMAT = 1
HEADER = "__header__"


class SnapshotRefused(ValueError):
    """A snapshot that must not be resumed from: the message names the reason (and the file)."""


@dataclass
class Snapshot:
    """A checked snapshot: the stream's header (`state`) and its arrays."""

    state: dict
    arrays: dict[str, np.ndarray]
    settings: dict


def skyrt_version() -> str:
    return str(_core.build_info()["version"])


def model_identity(model: str | os.PathLike | None) -> str:
    """sha256 (hex) naming the model: of its folder's files (relative names and contents), or of the
    name of the built-in default model when `model` is None. Each file's hash is remembered in the
    artifact cache by (path, size, mtime), so a restart does not read a multi-GB checkpoint again."""
    if model is None:
        return hashlib.sha256(f"skyrt-builtin-default-model:{skyrt_version()}".encode()).hexdigest()
    from .artifact_cache import cache_root, model_hash

    return model_hash(Path(model), cache_root())


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """One sha256 over every array: name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def encode_snapshot(state: dict, arrays: dict[str, np.ndarray], settings: dict, model: str) -> bytes:
    """The snapshot file's bytes (see the module docstring)."""
    if HEADER in arrays:
        raise ValueError(f"{HEADER!r} is the header's name, not an array's")
    header = {"format": SNAPSHOT_FORMAT, "skyrt": skyrt_version(), "model": model, "settings": settings,
              "arrays_sha256": arrays_sha256(arrays), "state": state}
    buffer = io.BytesIO()
    payload = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    payload[HEADER] = np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8)
    np.savez(buffer, **payload)
    return buffer.getvalue()


def write_snapshot(path: str | os.PathLike, state: dict, arrays: dict[str, np.ndarray], settings: dict,
                   model: str) -> int:
    """Write the snapshot to `path` atomically; returns its size in bytes."""
    data = encode_snapshot(state, arrays, settings, model)
    write_atomically(path, data)
    return len(data)


def _read_bytes(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if os.path.islink(path):
            raise SnapshotRefused(f"snapshot {path} is a symbolic link; skyrt reads only a plain file there") from None
        raise SnapshotRefused(f"snapshot {path} cannot be read ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _settings_difference(saved: dict, current: dict) -> str | None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key, "(unset)") != current.get(key, "(unset)"):
            return f"{key} was {saved.get(key, '(unset)')!r}, now {current.get(key, '(unset)')!r}"
    return None


def read_snapshot(path: str | os.PathLike, settings: dict, model: str) -> Snapshot:
    """The snapshot at `path`, checked against this run's settings and model; SnapshotRefused naming
    the reason when it is not one to resume from (the caller logs it and starts fresh)."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if HEADER not in npz.files:
                raise SnapshotRefused(f"snapshot {path} has no header: not a skyrt snapshot")
            header = json.loads(npz[HEADER].tobytes().decode("utf-8"))
            arrays = {name: npz[name] for name in npz.files if name != HEADER}
    except SnapshotRefused:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError) as err:
        raise SnapshotRefused(f"snapshot {path} is corrupt or truncated ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict):
        raise SnapshotRefused(f"snapshot {path}: its header is not a JSON object")
    if header.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotRefused(f"snapshot {path} has format {header.get('format')!r}; this skyrt reads format "
                              f"{SNAPSHOT_FORMAT}")
    if header.get("skyrt") != skyrt_version():
        raise SnapshotRefused(f"snapshot {path} was written by skyrt {header.get('skyrt')!r}, this is "
                              f"{skyrt_version()}")
    if header.get("model") != model:
        raise SnapshotRefused(f"snapshot {path} was taken with another model (identity "
                              f"{str(header.get('model'))[:16]}..., this one {model[:16]}...)")
    saved_settings = header.get("settings")
    if not isinstance(saved_settings, dict):
        raise SnapshotRefused(f"snapshot {path}: no settings in its header")
    difference = _settings_difference(saved_settings, settings)
    if difference is not None:
        raise SnapshotRefused(f"snapshot {path} was taken with other settings: {difference}")
    if header.get("arrays_sha256") != arrays_sha256(arrays):
        raise SnapshotRefused(f"snapshot {path} is corrupt: its arrays do not match their sha256")
    state = header.get("state")
    if not isinstance(state, dict):
        raise SnapshotRefused(f"snapshot {path}: no stream state in its header")
    return Snapshot(state=state, arrays=arrays, settings=saved_settings)


__all__ = ["SNAPSHOT_FORMAT", "Snapshot", "SnapshotRefused", "arrays_sha256", "encode_snapshot", "model_identity",
           "read_snapshot", "skyrt_version", "write_snapshot"]
