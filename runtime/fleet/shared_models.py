"""Loaded models shared by the streams of one process (no Ray here): the fleet's GPU worker
(gpu_worker.py) holds one `ModelCache`, so streams of the same model on one logical GPU run on one
copy of its weights, and admission (admission.py) counts those weights once per GPU.

A model's key is what makes two loads interchangeable: the model (its folder, or the built-in
default), the backend, the device, the precision its memory is planned at, and the load options
(preset, decoder). Thread-count options are left out: they size a pool, not the weights. The folder
is keyed by its path, not by a hash of its files (hashing gigabytes on every admission would stall
the controller): a folder rewritten in place while its streams run keeps the copy already loaded.

The cache is reference counted: every stream that uses a model holds one reference; the model is
dropped when its last stream lets go, so a later stream of it loads it afresh.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

BUILTIN_MODEL = "<built-in default model>"
THREAD_OPTIONS = ("threads",)  # runtime/threads.py backend_thread_options: a pool size, not a weight


@dataclass(frozen=True)
class ModelKey:
    """What identifies one loaded copy of a model's weights in a process."""

    model: str
    backend: str
    device: str
    precision: str
    options: tuple[tuple[str, str], ...] = ()

    def label(self) -> str:
        """A short readable name (status, logs)."""
        return f"{self.model} [{self.backend}, {self.device}, {self.precision}]"


def model_key(spec, precision: str) -> ModelKey:
    """The key of a PipelineSpec (generator_process.py) at `precision` (StreamConfig.precision)."""
    options = tuple(sorted((k, repr(v)) for k, v in spec.options.items() if k not in THREAD_OPTIONS))
    return ModelKey(spec.model or BUILTIN_MODEL, spec.backend, spec.device, precision, options)


@dataclass
class _Entry:
    model: object
    users: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one chunk at a time on these weights


class ModelCache:
    """Loaded models by key, each with the set of streams that use it (thread safe)."""

    def __init__(self):
        self._entries: dict[ModelKey, _Entry] = {}
        self._lock = threading.Lock()
        self._loading: dict[ModelKey, threading.Lock] = {}
        self.loads = 0  # models loaded since the process started (a shared one is loaded once)

    def acquire(self, key: ModelKey, user: str, load: Callable[[], object]) -> object:
        """The model of `key` for stream `user`, loading it with `load()` if no stream holds it. A stream
        that acquires again keeps its one reference."""
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # two streams of a new model: one loads, the other waits for that copy
            with self._lock:
                entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(load())
                self.loads += 1
                with self._lock:
                    self._entries[key] = entry
            with self._lock:
                entry.users.add(user)
            return entry.model

    def release(self, user: str) -> list[ModelKey]:
        """Drop `user`'s references; returns the keys whose last user it was (now freed)."""
        freed = []
        with self._lock:
            for key, entry in list(self._entries.items()):
                entry.users.discard(user)
                if not entry.users:
                    del self._entries[key]
                    freed.append(key)
        return freed

    def lock_of(self, key: ModelKey) -> threading.Lock:
        """The lock that serializes chunks on one model's weights (its streams take turns)."""
        with self._lock:
            return self._entries[key].lock

    def describe(self) -> list[dict]:
        """Each loaded model: its key, the streams using it and the id of the loaded object (JSON-able;
        two streams showing one id run on one copy of the weights)."""
        with self._lock:
            return [{"model": key.label(), "streams": sorted(entry.users), "object_id": id(entry.model)}
                    for key, entry in self._entries.items()]
