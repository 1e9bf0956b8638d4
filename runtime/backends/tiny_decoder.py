"""The tiny decoder's streaming step on an exported-graph backend's bound buffers (decoder="tiny").

One graph per latent size (runtime/tiny_decoder.py): raw latent frame + the 9 MemBlock memories in,
4 pixel frames + the new memories out. The memories are carried across calls as explicit graph inputs
and outputs, in two sets of skyrt._core.Buffers on the backend's memory device (exported_graphs.py
PingPongDecoder, shared with the Wan VAE's BoundStreamingDecoder: each call reads one set and writes the
other); the first call of a stream reads zeros and drops its first STARTUP_FRAMES frames. Per frame only
the latent frame goes up and the pixels come down.

Where the graph comes from is the backend's `tiny_decoder_folder(h, w)`: onnxruntime runs the ONNX export
folder (exported on first use); TensorRT an engine folder built from it on first use (tensorrt_backend.py).
"""
from __future__ import annotations

import numpy as np

from ..tiny_decoder import STARTUP_FRAMES, TinyDecoderSource, read_tiny_export
from .exported_graphs import PingPongDecoder, _Graph


class BoundTinyStreamingDecoder(PingPongDecoder):
    """decode_next: raw latent frame [16, 1, h, w] -> pixels [3, 1 (first) or 4, 8h, 8w] in [-1, 1]."""

    def __init__(self, backend, source: TinyDecoderSource):
        self.source = source
        self._graph: _Graph | None = None
        super().__init__(backend)

    def decode_next(self, mu_frame: np.ndarray) -> np.ndarray:
        from skyrt import _core

        if mu_frame.ndim != 4 or mu_frame.shape[1] != 1:
            raise ValueError(f"decode_next takes one raw latent frame [16, 1, h, w], got {mu_frame.shape}")
        _, _, h, w = mu_frame.shape
        if self._size != (h, w):
            self._prepare(h, w)
        stream = self.backend.stream_handle()
        read, write = self.read_write_sets()
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
        return out[0, :, STARTUP_FRAMES:] if self._flip() else out[0]

    def _prepare(self, h: int, w: int) -> None:
        """The graph for h x w (the backend's tiny_decoder_folder: exported / built on first use) and its
        buffers, once per size."""
        self.close()
        folder = self.backend.tiny_decoder_folder(h, w)
        entry = read_tiny_export(folder)["graph"]
        self._graph = _Graph("tiny_decoder_step", folder, entry)
        memories = {s["name"]: s["shape"] for s in entry["inputs"][1:]}
        self._allocate_sets(memories, {entry["inputs"][0]["name"]: entry["inputs"][0]["shape"],
                                       entry["outputs"][0]["name"]: entry["outputs"][0]["shape"]})
        self._size = (h, w)
        self.reset()


__all__ = ["BoundTinyStreamingDecoder"]
