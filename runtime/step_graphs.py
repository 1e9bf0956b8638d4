"""One CUDA graph per step shape: the host logic, torch-free and testable without a GPU.

A KV-cached stream runs a handful of step shapes over and over (the denoising step of one block, its
commit pass, LongLive's recache chunk, a rolling window of blocks in flight). `StepGraphs` keeps one
captured graph per shape key and decides, call by call:

- a key seen fewer than `warmup` times runs eagerly (`GraphMechanism.warmup`): lazy library state
  (cuBLAS handles and workspaces, kernel autotuning) is set up outside any capture;
- then it is captured once (`GraphMechanism.capture`) and replayed at once (a capture records the
  launches, it runs nothing, so the step's results come from that first replay);
- from then on it is replayed; the graph's outputs are the same tensors every time.

A graph reads and writes memory by address. The caller names the addresses a key's graph reads from
outside its own static buffers (`addresses`: the stream's ring, the prompt K/V); when they differ from
the ones it was captured with, the graph is dropped and the key starts over (warm-up, capture),
never replayed on freed memory. `invalidate(reason)` drops every graph (or one key's) on purpose, and
its reason is kept (`invalidations`) for logs and tests.

What does NOT invalidate: a RoPE rebase (the active tokens' cos/sin are copied into static inputs
each step, the ring is rotated in place), a prompt switch whose K/V have the same shape (copied into
the static prompt buffers), a different ring validity (an additive mask in a static buffer).
A resolution change is a new stream, whose session has a StepGraphs of its own.

The mechanism is injected: skyrt.export.static_step.TorchCudaGraphs (torch.cuda.CUDAGraph, one
memory pool per stream) on a GPU; tests/test_static_step.py a CPU stand-in that records captures and
replays and replays by running the step again into the captured outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol


class CapturedGraph(Protocol):
    """One captured step: `outputs` are the step's static outputs, written by every replay."""

    outputs: Any

    def replay(self) -> None: ...

    def close(self) -> None: ...


class GraphMechanism(Protocol):
    """How steps are run eagerly before a capture, and captured."""

    def warmup(self, fn: Callable[[], Any]) -> Any:
        """Run fn once eagerly (on a GPU: on the capture's side stream) and return its outputs."""

    def capture(self, fn: Callable[[], Any]) -> CapturedGraph:
        """Record fn's launches into a graph (nothing runs); its outputs become the graph's."""


@dataclass
class KeyStats:
    """What one step shape did: eager warm-up runs, captures and replays."""

    eager: int = 0
    captures: int = 0
    replays: int = 0


@dataclass
class _Entry:
    warmups: int = 0
    graph: Any = None
    addresses: tuple = ()


@dataclass
class StepGraphs:
    """Graphs by step-shape key over an injected mechanism (module docstring). warmup: eager runs of a
    key before its capture (>= 0)."""

    mechanism: GraphMechanism
    warmup: int = 2
    stats: dict[Hashable, KeyStats] = field(default_factory=dict)
    invalidations: list[str] = field(default_factory=list)
    _entries: dict[Hashable, _Entry] = field(default_factory=dict)

    def __post_init__(self):
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup}: the eager runs before a capture must be 0 or more")

    def run(self, key: Hashable, fn: Callable[[], Any], addresses: tuple = ()) -> Any:
        """fn's outputs for step shape `key`: eager while warming up, else from the key's graph
        (captured now if it has none). `addresses`: what the graph reads outside fn's own buffers, as
        hashable (name, address, shape) entries; a change drops the graph and starts the key over."""
        entry = self._entries.get(key)
        if entry is not None and entry.graph is not None and entry.addresses != tuple(addresses):
            self.invalidate(f"step {key!r}: the buffers it reads moved since its capture", key)
            entry = None
        if entry is None:
            entry = self._entries[key] = _Entry()
        stats = self.stats.setdefault(key, KeyStats())
        if entry.graph is None:
            if entry.warmups < self.warmup:
                entry.warmups += 1
                stats.eager += 1
                return self.mechanism.warmup(fn)
            entry.graph, entry.addresses = self.mechanism.capture(fn), tuple(addresses)
            stats.captures += 1
        entry.graph.replay()
        stats.replays += 1
        return entry.graph.outputs

    def captured(self, key: Hashable) -> bool:
        """Whether `key` has a live graph."""
        entry = self._entries.get(key)
        return entry is not None and entry.graph is not None

    def invalidate(self, reason: str, key: Hashable | None = None) -> None:
        """Drop every graph (key None) or one key's, releasing them; those keys start over (warm-up,
        capture). The reason is kept in `invalidations`."""
        keys = list(self._entries) if key is None else [key]
        for k in keys:
            entry = self._entries.pop(k, None)
            if entry is not None and entry.graph is not None:
                entry.graph.close()
        self.invalidations.append(reason)

    def close(self) -> None:
        """Release every graph (the stream ends)."""
        for entry in self._entries.values():
            if entry.graph is not None:
                entry.graph.close()
        self._entries.clear()


__all__ = ["CapturedGraph", "GraphMechanism", "KeyStats", "StepGraphs"]
