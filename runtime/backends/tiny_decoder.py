"""The tiny decoder's streaming step on an exported-graph backend's bound buffers (decoder="tiny").

One graph per latent size (runtime/tiny_decoder.py): raw latent frame + the 9 MemBlock memories in,
4 pixel frames + the new memories out. The memories are carried across calls as explicit graph inputs
and outputs, in two sets of skyrt._core.Buffers on the backend's memory device (each call reads one
set and writes the other, as BoundStreamingDecoder does with the Wan VAE's causal-conv caches); the
first call of a stream reads zeros and drops its first STARTUP_FRAMES frames. Per frame only the
latent frame goes up and the pixels come down.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..tiny_decoder import STARTUP_FRAMES, TinyDecoderSource, read_tiny_export
from .base import StreamingDecoder
from .exported_graphs import _Graph


class BoundTinyStreamingDecoder(StreamingDecoder):
    """decode_next: raw latent frame [16, 1, h, w] -> pixels [3, 1 (first) or 4, 8h, 8w] in [-1, 1]."""

    def __init__(self, backend, source: TinyDecoderSource):
        self.backend, self.source = backend, source
        self._size: tuple[int, int] | None = None
        self._graph: _Graph | None = None
        self._buffers: dict[str, Any] = {}
        self._sets: list[dict[str, Any]] = []
        self._bindings: dict = {}
        self.reset()

    def reset(self) -> None:
        self._first, self._current = True, 0

    def decode_next(self, mu_frame: np.ndarray) -> np.ndarray:
        from skyrt import _core

        if mu_frame.ndim != 4 or mu_frame.shape[1] != 1:
            raise ValueError(f"decode_next takes one raw latent frame [16, 1, h, w], got {mu_frame.shape}")
        _, _, h, w = mu_frame.shape
        if self._size != (h, w):
            self._prepare(h, w)
        stream = self.backend.stream_handle()
        read, write = self._sets[self._current], self._sets[1 - self._current]
        if self._first:
            for buffer in read.values():
                _core.fill_zero(buffer, stream)
        graph = self._graph
        mu_name = graph.entry["inputs"][0]["name"]
        pixels_name = graph.entry["outputs"][0]["name"]
        _core.upload(self._buffers[mu_name], np.ascontiguousarray(mu_frame[None], np.float32), stream)
        inputs = {mu_name: self._buffers[mu_name], **{n: read[n] for n in read}}
        outputs = {pixels_name: self._buffers[pixels_name], **{f"new_{n}": write[n] for n in write}}
        self.backend.synchronize()
        self.backend._run_bound(graph, inputs, outputs, self._bindings, ("tiny_decoder", self._current))
        out = np.empty(graph.entry["outputs"][0]["shape"], np.float32)
        _core.download(self._buffers[pixels_name], out, stream)
        first, self._first, self._current = self._first, False, 1 - self._current
        return out[0, :, STARTUP_FRAMES:] if first else out[0]

    def _prepare(self, h: int, w: int) -> None:
        """The graph for h x w (exported on first use) and its buffers, once per size."""
        from skyrt import _core

        self.close()
        folder = self.source.folder_for(h, w)
        entry = read_tiny_export(folder)["graph"]
        self._graph = _Graph("tiny_decoder_step", folder, entry)
        device, stream = self.backend.memory_device(), self.backend.stream_handle()
        alloc = lambda shape: _core.Buffer.allocate(list(shape), "float32", device, True, stream)  # noqa: E731
        memories = {s["name"]: s["shape"] for s in entry["inputs"][1:]}
        self._sets = [{name: alloc(shape) for name, shape in memories.items()} for _ in range(2)]
        self._buffers = {entry["inputs"][0]["name"]: alloc(entry["inputs"][0]["shape"]),
                         entry["outputs"][0]["name"]: alloc(entry["outputs"][0]["shape"])}
        self._size = (h, w)
        self.reset()

    def close(self) -> None:
        """Release the buffers and bindings now (a later frame allocates them again)."""
        bindings, self._bindings = self._bindings, {}
        for value in bindings.values():
            closer = getattr(value, "close", None)
            if closer is not None:
                closer()
        for buffer in [*self._buffers.values(), *(b for s in self._sets for b in s.values())]:
            buffer.close()
        self._buffers, self._sets, self._size = {}, [], None


__all__ = ["BoundTinyStreamingDecoder"]
