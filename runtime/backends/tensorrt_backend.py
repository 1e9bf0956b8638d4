"""The TensorRT backend: skyrt's engines on an NVIDIA GPU, torch-free.

    skyrt export onnx --model DIR --out onnx/ && skyrt export engine --onnx onnx/ --out engines/
    pipe = skyrt.load("engines/", backend="tensorrt")

It is the onnxruntime backend's host logic (tokenizer, float64 time sinusoid, RoPE tables, VAE
cache plumbing, the rollout contract) with every graph call replaced by an engine call:
- engines run with `execute_async_v3` on one CUDA stream; inputs and outputs live in device
  buffers allocated once per shape (cuda-python), host arrays are copied in and out;
- the KV cache lives on the device (`DeviceKVCache`) and is written and rebased in place by the
  skyrt._core.cuda kernels; the step engine reads it by address, never through the host;
- per-prompt cross-attention K/V stay on the device;
- with `cuda_graphs=True` the KV-cached step (static shapes per active-block count) is captured
  once per (frames, cache) and replayed.
Engines built by TensorRT-RTX run through the `tensorrt_rtx` module, others through `tensorrt`;
each engine's manifest is checked against the running library and GPU before it is loaded.

NOT EXECUTED in skyrt's CI (no GPU there): benchmarks/gpu_validate.py compares this backend's
rollout with onnxruntime-CPU on the user's machine.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..engine_manifest import ENGINE_MANIFEST_SUFFIX, EngineManifest, check_engine
from .base import ModelSpec, TextContext
from .onnxruntime_backend import OnnxRuntimeBackend, OrtPrompt, _Graph

ONNX_MANIFEST_COPY = "onnx_manifest.json"  # the ONNX export's manifest, copied beside the engines


def is_engine_folder(path: str | Path) -> bool:
    return (Path(path) / ONNX_MANIFEST_COPY).is_file() and any(Path(path).glob(f"*{ENGINE_MANIFEST_SUFFIX}"))


def engine_folder_spec(path: str | Path) -> ModelSpec:
    path = Path(path).expanduser()
    manifest = json.loads((path / ONNX_MANIFEST_COPY).read_text())
    return ModelSpec(path=path, layout="engines", dit_config=manifest["model"]["dit_config"])


def prepare_engine_folder(onnx_dir: Path, engine_dir: Path) -> None:
    """What `skyrt export engine` adds beside the engines: the ONNX manifest and the tokenizer."""
    manifest = json.loads((Path(onnx_dir) / "manifest.json").read_text())
    (Path(engine_dir) / ONNX_MANIFEST_COPY).write_text(json.dumps(manifest, indent=2) + "\n")
    tokenizer = (manifest.get("tokenizer") or {}).get("file")
    if tokenizer:
        shutil.copy2(Path(onnx_dir) / tokenizer, Path(engine_dir) / tokenizer)


class DeviceKVCache:
    """One prompt context's ring K/V on the GPU: k, v [layers, slots, tokens, heads, head_dim]."""

    def __init__(self, layers: int, slots: int, tokens: int, heads: int, head_dim: int, dtype, stream):
        from ..cuda_mem import DeviceArray

        self.shape = (layers, slots, tokens, heads, head_dim)
        self.dtype = np.dtype(dtype)
        self.stream = stream
        # Zeros: masked slots must hold finite values (NaN garbage poisons the softmax).
        self.k = DeviceArray.zeros(self.shape, self.dtype, stream)
        self.v = DeviceArray.zeros(self.shape, self.dtype, stream)

    def write(self, slot: int, k, v) -> None:
        """k, v: the step's new K/V [layers, 1, tokens, heads, head_dim] device arrays -> slot."""
        from skyrt import _core

        layers, slots, tokens, heads, head_dim = self.shape
        block = tokens * heads * head_dim
        dtype = "float16" if self.dtype == np.float16 else "float32"
        for src, dst in ((k, self.k), (v, self.v)):
            _core.cuda.kv_write_block(src.ptr, block, dst.ptr, slots * block, block, slot, layers, block, dtype,
                                      self.stream.handle)

    def rebase(self, shift: int) -> None:
        from skyrt import _core

        layers, slots, tokens, heads, head_dim = self.shape
        _core.cuda.kv_rope_rebase(self.k.ptr, layers, slots, tokens, heads, head_dim, slots * tokens * heads * head_dim,
                                  tokens * heads * head_dim, heads * head_dim, head_dim, shift, 10000.0,
                                  "float16" if self.dtype == np.float16 else "float32", self.stream.handle)


class TrtEngine:
    """One deserialized engine, its execution context and its reusable device I/O buffers."""

    def __init__(self, trt, runtime, path: Path, stream, cuda_graphs: bool = False):
        self.trt, self.stream, self.name = trt, stream, path.stem
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {path}; rebuild it (the command is in {path.name}.json)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT  # noqa: E731
        self.inputs = [n for n in names if is_input(n)]
        self.outputs = [n for n in names if not is_input(n)]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, Any] = {}
        self._cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, Any] = {}

    def _buffer(self, name: str, shape: tuple[int, ...]):
        from ..cuda_mem import DeviceArray

        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape:
            if buf is not None:
                buf.free()
            buf = self._buffers[name] = DeviceArray.empty(shape, self.dtypes[name])
        return buf

    def run(self, feeds: dict, keep_on_device: Sequence[str] = ()) -> list:
        """feeds: name -> numpy array (copied in) or DeviceArray (bound by address). Outputs in engine
        order: numpy, or fresh DeviceArray copies for `keep_on_device` (the I/O buffers are reused)."""
        from ..cuda_mem import DeviceArray

        key = []
        for name in self.inputs:
            value = feeds[name]
            shape = tuple(int(d) for d in value.shape)
            self.context.set_input_shape(name, shape)
            if isinstance(value, DeviceArray):
                address = value.ptr
            else:
                buf = self._buffer(name, shape)
                buf.upload(np.ascontiguousarray(value, dtype=self.dtypes[name]), self.stream)
                address = buf.ptr
            self.context.set_tensor_address(name, address)
            key.append((name, shape, address))
        out_buffers = []
        for name in self.outputs:
            buf = self._buffer(name, tuple(self.context.get_tensor_shape(name)))
            self.context.set_tensor_address(name, buf.ptr)
            out_buffers.append(buf)
            key.append((name, buf.shape, buf.ptr))
        self._launch(tuple(key))
        results = []
        for name, buf in zip(self.outputs, out_buffers):
            if name in keep_on_device:
                copy = DeviceArray.empty(buf.shape, buf.dtype)
                copy.copy_from(buf, self.stream)
                results.append(copy)
            else:
                results.append(buf.download(self.stream))
        self.stream.synchronize()
        return results

    def _launch(self, key: tuple) -> None:
        """execute_async_v3, or the CUDA graph captured for exactly these shapes and addresses."""
        if not self._cuda_graphs:
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError(f"TensorRT failed to run {self.name}")
            return
        from ..cuda_mem import CudaGraph

        graph = self._graphs.get(key)
        if graph is None:
            # TensorRT needs one plain run after shape changes before a capture is valid.
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError(f"TensorRT failed to run {self.name}")
            graph = CudaGraph(self.stream)
            graph.capture(lambda: self.context.execute_async_v3(self.stream.handle))
            self._graphs[key] = graph
        graph.replay()


class TensorRTBackend(OnnxRuntimeBackend):
    """Runs engines built by `skyrt export engine` from an engine folder; see the module docstring."""

    name = "tensorrt"

    def __init__(self, model: ModelSpec, device: str = "cuda", cuda_graphs: bool = False, **_ignored):
        # Deliberately not OnnxRuntimeBackend.__init__: no onnxruntime sessions, no exports.
        from ..cuda_mem import Stream, compute_capability

        self.model = model
        self.device = device
        self.folder = Path(model.path)
        if not is_engine_folder(self.folder):
            raise FileNotFoundError(f"{self.folder} is not an engine folder (needs {ONNX_MANIFEST_COPY} and "
                                    f"*{ENGINE_MANIFEST_SUFFIX}): skyrt export engine --onnx ONNX_DIR --out "
                                    f"{self.folder}")
        self.precision = "engine"
        self.progress = False
        self.source = None
        self.threads = None
        self.export_options = {}
        self._sessions: dict[Path, Any] = {}
        self._folders, self._manifests = [self.folder], {self.folder: json.loads((self.folder / ONNX_MANIFEST_COPY).read_text())}
        self._tokenizer = None
        self._read_dit_layout(model.dit_config)
        self.engine_manifests = {m.name: m for m in map(EngineManifest.read, self.folder.glob(f"*{ENGINE_MANIFEST_SUFFIX}"))}
        builders = {m.builder for m in self.engine_manifests.values()}
        if len(builders) != 1:
            raise ValueError(f"{self.folder} mixes engines from {sorted(builders)}; rebuild them with one builder")
        self.builder = builders.pop()
        from skyrt.export.engine import import_builder  # torch-free

        self.trt = import_builder(self.builder)
        # Library version first (no GPU needed), then the GPU: each mismatch names the rebuild command.
        for manifest in self.engine_manifests.values():
            check_engine(manifest, builder=self.builder, builder_version=self.trt.__version__,
                         gpu_compute_capability=None)
        self.stream = Stream()  # a clear CudaError on a machine without a GPU
        self.gpu_compute_capability = compute_capability()
        for manifest in self.engine_manifests.values():
            check_engine(manifest, builder=self.builder, builder_version=self.trt.__version__,
                         gpu_compute_capability=self.gpu_compute_capability)
        self._runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.cuda_graphs = cuda_graphs

    # ---- engines instead of sessions ------------------------------------------------------------
    @property
    def _on_gpu(self) -> bool:
        return True

    def _session(self, graph: _Graph) -> TrtEngine:
        engine = self._sessions.get(graph.path)
        if engine is None:
            manifest = self.engine_manifests.get(graph.name)
            if manifest is None:
                raise FileNotFoundError(f"{self.folder} has no engine for {graph.name}: build it with skyrt export "
                                        f"engine --onnx ONNX_DIR --out {self.folder}")
            if manifest.onnx_sha256 != graph.entry["sha256"][graph.entry["file"]]:
                raise RuntimeError(f"engine {manifest.engine_file} was built from another export of {graph.name}; "
                                   f"rebuild it: {manifest.rebuild}")
            engine = TrtEngine(self.trt, self._runtime, self.folder / manifest.engine_file, self.stream,
                               cuda_graphs=self.cuda_graphs and graph.name == "dit_step")
            self._sessions[graph.path] = engine
        return engine

    def _run(self, graph: _Graph, feeds: dict, keep_on_device: Sequence[str] = ()) -> list:
        engine = self._session(graph)
        outputs = engine.run(feeds, keep_on_device)
        by_name = dict(zip(engine.outputs, outputs))
        return [by_name[o["name"]] for o in graph.entry["outputs"]]  # manifest order, as onnxruntime gives

    def _export_group(self, group: str, needs: dict) -> Path:
        raise ValueError(f"the engine folder {self.folder} has no graph for {group} {needs}; export it and rebuild "
                         "the engines (skyrt export onnx ... && skyrt export engine ...)")

    # ---- the KV cache on the device ---------------------------------------------------------------
    def new_kv_cache(self, layers: int, slots: int, tokens_per_block: int, heads: int, head_dim: int):
        graph = self._find("dit_step", {}) or self._graph("dit_step")
        return DeviceKVCache(layers, slots, tokens_per_block, heads, head_dim, graph.input_dtype("cache_k"), self.stream)

    def kv_prompt(self, context: TextContext) -> OrtPrompt:
        return self._cross_kv(context)

    def kv_step(self, latents, timesteps, prompt, cache, slot_valid, first_position, fps_class, block_size):
        """dit_step reading the device cache by address; velocity comes back to the host, the new K/V
        stay on the device for DeviceKVCache.write."""
        from ..cuda_mem import DeviceArray
        from .onnxruntime_backend import PATCH, SPATIAL, rope_cos_sin, timestep_sinusoid

        _, frames, h, w = latents.shape
        layers, slots, tokens, heads, head_dim = cache.shape
        graph = self._graph("dit_step", height=h * SPATIAL, width=w * SPATIAL, block_frames=block_size,
                            cache_blocks=slots)
        cos, sin = rope_cos_sin(self.head_dim, int(first_position), frames, h // PATCH, w // PATCH,
                                self.rope_max_positions)
        flat = (layers, 1, slots * tokens, heads, head_dim)  # the same memory, as the engine sees it
        feeds = {"latents": np.ascontiguousarray(latents, dtype=np.float32)[None],
                 "t_emb": timestep_sinusoid(np.asarray(timesteps, np.float32)[None], self.freq_dim),
                 "cross_k": prompt.k, "cross_v": prompt.v,
                 "cache_k": DeviceArray(flat, cache.dtype, cache.k.ptr),
                 "cache_v": DeviceArray(flat, cache.dtype, cache.v.ptr),
                 "slot_valid": np.asarray(slot_valid, dtype=bool).reshape(1, slots),
                 "rope_cos": cos, "rope_sin": sin, **self._fps_feed(fps_class)}
        velocity, new_k, new_v = self._run(graph, feeds, keep_on_device=("new_k", "new_v"))
        return velocity[0], new_k, new_v


__all__ = ["DeviceKVCache", "TensorRTBackend", "TrtEngine", "engine_folder_spec", "is_engine_folder",
           "prepare_engine_folder"]
