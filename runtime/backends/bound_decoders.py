"""The streaming decoders of the exported-graph backends, on bound buffers: a decoder graph whose carried
state is explicit graph I/O, kept in two sets of skyrt._core.Buffers on the backend's memory device
(PingPongDecoder: each call reads one set and writes the other).

- BoundStreamingDecoder: the Wan VAE (vae_decode_first, then vae_decode_step; the causal-conv caches).
- BoundTinyStreamingDecoder (decoder="tiny"): one graph per latent size (runtime/tiny_decoder.py): raw
  latent frame + the 9 MemBlock memories in, 4 pixel frames + the new memories out; the first call of a
  stream reads zeros and drops its first STARTUP_FRAMES frames. Where its graph comes from is the
  backend's `tiny_decoder_folder(h, w)`: onnxruntime runs the ONNX export folder (exported on first use);
  TensorRT an engine folder built from it on first use (tensorrt_backend.py).
Per frame only the latent frame goes up and the pixels come down.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..latents import SPATIAL_FACTOR as SPATIAL
from ..tiny_decoder import STARTUP_FRAMES, TinyDecoderSource, read_tiny_export
from .base import StreamingDecoder
from .graph_files import GraphFile


class PingPongDecoder(StreamingDecoder):
    """What the streaming decoders on bound buffers share: a decoder graph whose carried state (the Wan
    VAE's causal-conv caches, the tiny decoder's per-frame memories) is explicit graph I/O, kept in two
    sets of skyrt._core.Buffers on the backend's memory device. Each call reads set `_current` and
    writes the other (read_write_sets), then flips (_flip); a stream's first call reads zeros.
    Subclasses allocate with _allocate_sets in their _prepare (once per latent size)."""

    def __init__(self, backend):
        self.backend = backend
        self._size: tuple[int, int] | None = None
        self._buffers: dict[str, Any] = {}  # the per-call input / output buffers (latent frame, pixels)
        self._sets: list[dict[str, Any]] = []  # two {state name: Buffer}
        self._bindings: dict = {}
        self.reset()

    def reset(self) -> None:
        self._first, self._current = True, 0  # the first call starts from zero state (zeroed then)

    def _allocate_sets(self, state: Mapping[str, Sequence[int]], buffers: Mapping[str, Sequence[int]]) -> None:
        """Both state sets (name -> shape) and the per-call buffers, float32 on the memory device."""
        from skyrt import _core

        device, stream = self.backend.memory_device(), self.backend.stream_handle()
        alloc = lambda shape: _core.Buffer.allocate(list(shape), "float32", device, True, stream)  # noqa: E731
        self._sets = [{name: alloc(shape) for name, shape in state.items()} for _ in range(2)]
        self._buffers = {name: alloc(shape) for name, shape in buffers.items()}

    def read_write_sets(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the set this call reads, the set it writes); the read set is zeroed on a stream's first call."""
        from skyrt import _core

        read, write = self._sets[self._current], self._sets[1 - self._current]
        if self._first:
            stream = self.backend.stream_handle()
            for buffer in read.values():
                _core.fill_zero(buffer, stream)
        return read, write

    def _flip(self) -> bool:
        """After a call: the written set is read next. Returns whether that call was the stream's first."""
        first, self._first, self._current = self._first, False, 1 - self._current
        return first

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


class BoundStreamingDecoder(PingPongDecoder):
    """vae_decode_first, then vae_decode_step, one latent frame per call, with the causal-conv caches
    kept in two sets of buffers on the backend's memory device (PingPongDecoder). Allocated at the
    first frame of a size (z [1, 16, 1, h, w], pixels, both cache sets), then per frame only the
    latent frame goes up and the decoded pixels come down."""

    def decode_next(self, mu_frame: np.ndarray) -> np.ndarray:
        """Raw latent frame [16, 1, h, w] -> pixels [3, 1 (first) or 4, H, W] in [-1, 1]."""
        from skyrt import _core

        _, _, h, w = mu_frame.shape
        if self._size != (h, w):
            self._prepare(h, w)
        stream = self.backend.stream_handle()
        graph = self._first_graph if self._first else self._step_graph
        read, write = self.read_write_sets()
        _core.upload(self._buffers["z"], np.ascontiguousarray(mu_frame, np.float32), stream)
        inputs = {"z": self._buffers["z"]}
        inputs.update({s["name"]: read[s["name"]] for s in graph.entry["inputs"][1:]})
        pixels_spec = graph.entry["outputs"][0]
        pixels = self._buffers["pixels"].slice(pixels_spec["shape"], 0)
        outputs = {pixels_spec["name"]: pixels}
        outputs.update({s["name"]: write[s["name"][len("new_"):]] for s in graph.entry["outputs"][1:]})
        self.backend.synchronize()
        self.backend._run_bound(graph, inputs, outputs, self._bindings, (graph.name, self._current))
        out = np.empty(pixels_spec["shape"], np.float32)
        _core.download(pixels, out, stream)
        self._flip()
        return out[0]

    def export_state(self) -> dict[str, np.ndarray]:
        """The causal-conv caches the next frame reads, downloaded ({} before the first frame)."""
        from skyrt import _core

        if self._first or self._size is None:
            return {}
        stream = self.backend.stream_handle()
        self.backend.synchronize()
        out = {"size": np.asarray(self._size, np.int64)}
        for name, buffer in self._sets[self._current].items():
            host = np.empty(buffer.shape, np.float32)
            _core.download(buffer, host, stream)
            out[f"cache/{name}"] = host
        return out

    def import_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue from export_state's caches ({}: the next frame is the first)."""
        from skyrt import _core

        if not arrays:
            self.reset()
            return
        h, w = (int(v) for v in arrays["size"])
        if self._size != (h, w):
            self._prepare(h, w)
        target = self._sets[0]
        given = {k[len("cache/"):] for k in arrays if k.startswith("cache/")}
        if given != set(target):
            raise ValueError(f"the saved decoder has caches {sorted(given)[:3]}..., this one {sorted(target)[:3]}...")
        stream = self.backend.stream_handle()
        for name, buffer in target.items():
            host = np.ascontiguousarray(arrays[f"cache/{name}"], np.float32)
            if tuple(host.shape) != tuple(buffer.shape):
                raise ValueError(f"decoder cache {name} is {host.shape}, this decoder's {tuple(buffer.shape)}")
            _core.upload(buffer, host, stream)
        self._first, self._current = False, 0

    def _prepare(self, h: int, w: int) -> None:
        """Buffers for latent frames of h x w: the graphs' static shapes, once per size."""
        self.close()
        size = dict(height=h * SPATIAL, width=w * SPATIAL)
        self._first_graph = self.backend._graph("vae_decode_first", **size)
        self._step_graph = self.backend._graph("vae_decode_step", **size)
        caches = {}
        for graph in (self._first_graph, self._step_graph):
            for spec in graph.entry["inputs"][1:]:
                caches[spec["name"]] = spec["shape"]
        pixel_elems = max(int(np.prod(g.entry["outputs"][0]["shape"])) for g in (self._first_graph, self._step_graph))
        self._allocate_sets(caches, {"z": self._first_graph.entry["inputs"][0]["shape"], "pixels": [pixel_elems]})
        self._size = (h, w)
        self.reset()


class BoundTinyStreamingDecoder(PingPongDecoder):
    """decode_next: raw latent frame [16, 1, h, w] -> pixels [3, 1 (first) or 4, 8h, 8w] in [-1, 1]."""

    def __init__(self, backend, source: TinyDecoderSource):
        self.source = source
        self._graph: GraphFile | None = None
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
        self._graph = GraphFile("tiny_decoder_step", folder, entry)
        memories = {s["name"]: s["shape"] for s in entry["inputs"][1:]}
        self._allocate_sets(memories, {entry["inputs"][0]["name"]: entry["inputs"][0]["shape"],
                                       entry["outputs"][0]["name"]: entry["outputs"][0]["shape"]})
        self._size = (h, w)
        self.reset()


__all__ = ["BoundStreamingDecoder", "BoundTinyStreamingDecoder", "PingPongDecoder"]
