"""The TensorRT backend: skyrt's engines on an NVIDIA GPU, torch-free.

    pipe = skyrt.load("engines/", backend="tensorrt")      # an engine folder (skyrt export engine)
    pipe = skyrt.load("onnx/", backend="tensorrt")         # an ONNX export: engines built on load
    pipe = skyrt.load("/models/DF-1.3B", backend="tensorrt")  # a model folder: exported + built on first use

What it is given decides what it does first:
- an ENGINE folder (`skyrt export engine`): every engine manifest is checked against the running
  TensorRT (version, ONNX hash, file size) at once, then the GPU's compute capability;
- an ONNX EXPORT folder (`skyrt export onnx`): engines are built into the cache first;
- a MODEL folder (official or diffusers layout): graphs are exported to ONNX in a subprocess
  (torch is imported there, never here) exactly as the onnxruntime backend does, group by group
  when first needed, and each group's engines are built right after.
Built engines live in $SKYRT_CACHE/engines/<builder>-<version>/<key>, the key hashing the ONNX
files, the builder and its version, the target compute capabilities and the builder options: a
second load with the same inputs reuses them, anything else builds anew. Builder: `builder="auto"`
takes standard TensorRT when it imports (it builds on the GPU at hand) and TensorRT-RTX otherwise
(it builds without a GPU, for every RTX generation unless `compute_capabilities` says otherwise);
`builder="tensorrt"` or `"tensorrt-rtx"` forces one. Precision of exported graphs: fp16 by default
(TensorRT is strongly typed: an fp32 graph gives an fp32 engine without fp16 tensor cores).
The GPU is opened as soon as there is an engine to load: at once for engine and ONNX folders, after
the first group is built for a model folder.

It shares the host logic of every exported-graph backend (exported_graphs.py: tokenizer, float64
time sinusoid, RoPE tables, graph lookup, the DiT stream session) and runs each graph as an engine:
- engines run with `execute_async_v3` on one CUDA stream, the stream the rollout core's kernels use;
  all memory is skyrt._core.Buffer (allocated through the core, counted by _core.memory_stats);
- the DiT's one entry, a stream session's step (GraphKVStreamSession: dit_step against the ring, or a
  window graph, the same step with no cache inputs, in window mode) binds the core's ring, latents,
  velocity and new K/V and its own input and prompt K/V buffers by address: all allocated when the
  stream (or window) starts, released by its close() (a generator restart releases and allocates
  again); the velocity never leaves the GPU, cond and uncond run as one batch-2 call, and nothing is
  allocated per step;
- with `cuda_graphs=True` each step shape (active frames F) is captured once per stream and replayed;
  the key is F, never an address: the stream's buffers do not move while it lives, which each replay
  checks, and its graphs go with it;
- the streaming VAE keeps its causal caches on the GPU (two buffer sets, ping-pong); only decoded
  frames come back to the host. decoder="tiny" does the same with TAEHV's step graph and its per-frame
  memories (backends/bound_decoders.py); its engine is built on first use from its ONNX export
  (tiny_decoder_folder), so `--backend tensorrt --decoder tiny` needs only the taew2_1 weights file.
Engines built by TensorRT-RTX run through the `tensorrt_rtx` module, others through `tensorrt`.

NOT EXECUTED in skyrt's CI (no GPU there): everything up to opening the GPU is tested
(tests/test_tensorrt_backend.py), and the host logic of a whole stream runs there with onnxruntime
sessions standing in for the engines on host memory (tests/test_graph_sessions.py: zero allocations
after warm-up); benchmarks/gpu_validate.py compares this backend's rollout with onnxruntime-CPU on
the user's machine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .. import artifact_cache, tiny_decoder
from ..engine_manifest import (ENGINE_MANIFEST_SUFFIX, ONNX_MANIFEST_COPY, EngineManifest, EngineMismatchError,
                               check_engine, check_engine_size, read_engine_bytes)
from ..registry import resolve
from .base import ModelSpec
from .exported_graphs import ExportedGraphBackend, export_folder_spec, is_export_folder, read_manifest
from .graph_files import GraphFile

# What the host side feeds and reads (numpy has no bfloat16). fp8 graphs (export/quantize.py) are fp16
# graphs with FP8 weights behind DequantizeLinear: their inputs and outputs are the fp16 graphs'.
TRT_PRECISIONS = ("fp32", "fp16", "fp8")
STEP_GRAPHS = ("dit_step", "dit_step_full")  # the KV-cached steps: one CUDA graph per active frame count


def engine_folder_spec(path: str | Path | None) -> ModelSpec:
    """The ModelSpec of what the TensorRT backend is given (the name skyrt.load calls): an engine
    folder (layout 'engines'), an ONNX export folder ('onnx') or a model folder ('official' /
    'diffusers'); None is skyrt's built-in default model."""
    if path is None:
        from ..default_model import default_model_dir

        path = default_model_dir()
    path = Path(path).expanduser()
    if artifact_cache.is_engine_folder(path):
        manifest = json.loads((path / ONNX_MANIFEST_COPY).read_text())
        return ModelSpec(path=path, layout="engines", dit_config=manifest["model"]["dit_config"])
    if is_export_folder(path):
        return export_folder_spec(path)
    from ..model_folder import inspect_model_folder

    return inspect_model_folder(path)


# numpy dtype of an engine tensor -> the skyrt._core.Buffer dtype that holds it (bool as uint8)
_BUFFER_DTYPE = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.bool_): "uint8",
                 np.dtype(np.uint8): "uint8", np.dtype(np.int64): "int64"}


class TrtEngine:
    """One engine and its execution context, bound to skyrt._core.Buffers by address.

    bind() sets every input's shape and address and checks each output Buffer against the shape the
    engine computes; enqueue() runs it on the stream. run() is the host-array path (text encoder,
    VAE encoder): staging Buffers, one per tensor and shape, made once and reused."""

    def __init__(self, trt, engine, stream: int, name: str, device: str):
        self.trt, self.engine, self.stream, self.name, self.device = trt, engine, int(stream), name, device
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = lambda n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT  # noqa: E731
        self.inputs = [n for n in names if is_input(n)]
        self.outputs = [n for n in names if not is_input(n)]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._staging: dict[str, Any] = {}

    @classmethod
    def deserialize(cls, trt, runtime, data: bytes, path: Path, stream: int, device: str) -> "TrtEngine":
        """data: the engine file's bytes, already checked against its manifest (read_engine_bytes)."""
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise RuntimeError(f"TensorRT could not load {path}; rebuild it (the command is in {path.name}.json)")
        return cls(trt, engine, stream, path.stem, device)

    def bind(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Shapes and addresses of every tensor from Buffers; a missing tensor, a dtype the engine does
        not take or an output Buffer of another shape is a ValueError naming both."""
        for name in self.inputs:
            buf = self._given(inputs, name, "input")
            shape = tuple(int(d) for d in buf.shape)
            if not self.context.set_input_shape(name, shape):
                raise ValueError(f"{self.name}: input {name} of shape {shape} is outside the engine's optimization "
                                 f"profile (see the profile in {self.name}.engine.json)")
            self.context.set_tensor_address(name, buf.ptr)
        for name in self.outputs:
            buf = self._given(outputs, name, "output")
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if tuple(buf.shape) != shape:
                raise ValueError(f"{self.name}: output {name} is {shape}, its buffer {buf!r}")
            self.context.set_tensor_address(name, buf.ptr)

    def _given(self, buffers: Mapping[str, Any], name: str, kind: str):
        buf = buffers.get(name)
        if buf is None:
            raise ValueError(f"{self.name}: no buffer for {kind} {name} (given: {sorted(buffers)})")
        want = _BUFFER_DTYPE[self.dtypes[name]]
        if buf.dtype != want or buf.device != self.device:
            raise ValueError(f"{self.name}: {kind} {name} needs {want} on {self.device}, got {buf!r}")
        return buf

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT failed to run {self.name}")

    def run(self, feeds: Mapping[str, Any], out: Mapping[str, Any] | None = None) -> list:
        """Host arrays (copied into staging Buffers) or device memory (Buffers, or cuda_mem.DeviceArray
        views, bound by address) in; outputs in engine order: host arrays, except those named in `out`
        (name -> device memory at least as large), which are written there and returned as Buffers."""
        from skyrt import _core

        out = out or {}
        inputs = {}
        for name in self.inputs:
            value = feeds[name]
            device = self._as_buffer(value)
            if device is not None:
                inputs[name] = device
                continue
            array = np.ascontiguousarray(value, dtype=self.dtypes[name])
            inputs[name] = self._stage(name, array.shape)
            _core.upload(inputs[name], array, self.stream)
        for name in self.inputs:  # output shapes follow the input shapes
            if not self.context.set_input_shape(name, tuple(int(d) for d in inputs[name].shape)):
                raise ValueError(f"{self.name}: input {name} of shape {tuple(inputs[name].shape)} is outside the "
                                 f"engine's optimization profile (see the profile in {self.name}.engine.json)")
        outputs = {}
        for name in self.outputs:
            shape = [int(d) for d in self.context.get_tensor_shape(name)]
            if name in out:
                given = self._as_buffer(out[name])
                outputs[name] = given.slice(shape, 0)  # a ValueError when the engine's output does not fit
            else:
                outputs[name] = self._stage(name, tuple(shape))
        self.bind(inputs, outputs)
        self.enqueue()
        results = []
        for name in self.outputs:
            if name in out:
                results.append(outputs[name])
                continue
            host = np.empty(tuple(outputs[name].shape), self.dtypes[name])
            _core.download(outputs[name], host, self.stream)  # waits for the stream
            results.append(host)
        _core.synchronize(self.device, self.stream)
        return results

    def _as_buffer(self, value):
        """A Buffer over device memory given as a Buffer or a cuda_mem.DeviceArray; None for host arrays."""
        from skyrt import _core

        if isinstance(value, _core.Buffer):
            return value
        if isinstance(value, np.ndarray) or not hasattr(value, "ptr"):
            return None
        return _core.Buffer.wrap(int(value.ptr), [int(d) for d in value.shape], _BUFFER_DTYPE[np.dtype(value.dtype)],
                                 self.device)

    def _stage(self, name: str, shape: tuple[int, ...]):
        """The staging Buffer of tensor `name`, made for `shape` once (a new shape replaces it)."""
        from skyrt import _core

        buf = self._staging.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape):
            if buf is not None:
                buf.close()
            buf = self._staging[name] = _core.Buffer.allocate(list(shape), _BUFFER_DTYPE[self.dtypes[name]],
                                                               self.device, False, self.stream)
        return buf

    def close(self) -> None:
        for buf in self._staging.values():
            buf.close()
        self._staging = {}


def _check_precision(onnx_manifest: dict, folder: Path) -> None:
    """Refuse graphs whose engines this backend could not feed (before building them)."""
    precision = onnx_manifest.get("precision", "fp32")
    if precision not in TRT_PRECISIONS:
        raise ValueError(f"{folder} holds {precision} graphs; the TensorRT backend runs {' or '.join(TRT_PRECISIONS)} "
                         "(bf16 engines build, but the host side has no bfloat16 arrays yet)")


class TensorRTBackend(ExportedGraphBackend):
    """Runs skyrt's engines; given an ONNX export or a model folder, builds them first (module docstring).

    builder: 'auto', 'tensorrt' or 'tensorrt-rtx' (for an engine folder 'auto' means the one that
        built it). precision: of the graphs exported from a model folder ('fp16' or 'fp32').
    compute_capabilities: TensorRT-RTX targets of engines built here (default: every RTX
        generation, export/engine.py RTX_COMPUTE_CAPABILITIES).
    cache_dir: the cache root ($SKYRT_CACHE or ~/.cache/skyrt).
    decoder, decoder_path: "wan" or "tiny" (ExportedGraphBackend._choose_decoder); the tiny decoder's
        step graph runs as an engine built on first use (tiny_decoder_folder), or from an engine folder of
        it given as decoder_path (skyrt export engine --onnx TINY_EXPORT --out DIR).
    """

    name = "tensorrt"

    def __init__(self, model: ModelSpec, device: str = "cuda", cuda_graphs: bool = False, builder: str = "auto",
                 precision: str = "fp16", compute_capabilities: Sequence[str] | None = None,
                 optimization_level: int = 3, cache_dir: str | Path | None = None,
                 export_options: dict | None = None, progress: bool = True, decoder: str = "wan",
                 decoder_path: str | Path | None = None):
        super().__init__(model)
        if precision not in TRT_PRECISIONS:
            raise ValueError(f"precision={precision!r}: the TensorRT backend runs {' or '.join(TRT_PRECISIONS)} "
                             "graphs (bf16 engines build, but the host side has no bfloat16 arrays yet)")
        self.device, self.cuda_graphs, self.precision, self.progress = device, cuda_graphs, precision, progress
        self.threads = None
        self.export_options = dict(export_options or {})
        self.cache_root = artifact_cache.cache_root(cache_dir)
        self._sessions: dict[Path, Any] = {}
        self._folders: list[Path] = []
        self._manifests: dict[Path, dict] = {}  # engine folder -> its ONNX manifest copy
        self._engine_manifests: dict[Path, dict[str, EngineManifest]] = {}
        self._tokenizer = None
        self.stream = None  # opened with the first engine (_open_gpu)
        self._memory_device: str | None = None  # "cuda:N", set with the stream
        self._graph_factory = None  # cuda_mem.CudaGraph, set with the stream
        self.gpu_compute_capability: str | None = None
        self.source = None
        path = Path(model.path).expanduser()
        if model.layout == "engines" or artifact_cache.is_engine_folder(path):
            self._open_engine_folder(path, builder)
        else:
            self._prepare_builds(builder, compute_capabilities, optimization_level)
            if model.layout == "onnx" or is_export_folder(path):
                self._add_folder(self._engines_for(path))
            else:
                self._use_model_folder(path, cache_dir)  # a model folder: export + build group by group
        self._read_dit_layout(model.dit_config)
        self._tiny_engines: dict[Path, Path] = {}  # tiny decoder export folder -> its engine folder
        self._choose_decoder(decoder, decoder_path, path, cache_dir, progress)
        if self._folders:
            self._open_gpu()  # engines to load: without a GPU, fail here rather than at the first prompt

    # ---- where the engines come from --------------------------------------------------------------

    def _open_engine_folder(self, path: Path, builder: str) -> None:
        import_builder = resolve("engine:import_builder")  # torch-free

        if not artifact_cache.is_engine_folder(path):
            raise FileNotFoundError(f"{path} is not an engine folder (needs {ONNX_MANIFEST_COPY} and "
                                    f"*{ENGINE_MANIFEST_SUFFIX}): skyrt export engine --onnx ONNX_DIR --out {path}")
        builders = {EngineManifest.read(m).builder for m in path.glob(f"*{ENGINE_MANIFEST_SUFFIX}")}
        if builder == "auto":
            if len(builders) != 1:
                raise ValueError(f"{path} mixes engines from {sorted(builders)}; rebuild them with one builder")
            builder = builders.pop()
        self.builder = builder  # a forced builder that did not build them is refused by check_engine
        self.trt = import_builder(builder)
        self.build_options = None
        self._add_folder(path)

    def _prepare_builds(self, builder: str, compute_capabilities: Sequence[str] | None, level: int) -> None:
        """Pick the builder and fix the build options (their targets are part of the cache key)."""
        self.build_options, self.trt = artifact_cache.engine_build_options(builder, self.cache_root,
                                                                           compute_capabilities, level)
        self.builder = self.build_options.builder

    def _engines_for(self, onnx_dir: Path) -> Path:
        """The cached engine folder of an ONNX export folder, built first if needed (progress bar)."""
        _check_precision(read_manifest(onnx_dir), onnx_dir)  # before a build whose engines could not run
        return artifact_cache.cached_engine_folder(Path(onnx_dir), self.cache_root, self.build_options,
                                                   self.trt.__version__, progress=self.progress)

    def _export_group(self, group: str, needs: dict) -> Path:
        """A model folder's graph group: ONNX into the cache (subprocess, as onnxruntime does), then
        engines. (Only reached with a model folder: OnnxRuntimeBackend._graph exports when source is set.)"""
        return self._engines_for(super()._export_group(group, needs))

    def _add_folder(self, folder: Path) -> None:
        """Read an engine folder and refuse, before any GPU work, engines this TensorRT cannot use or
        that do not belong to the ONNX graphs beside them."""
        if folder in self._folders:
            return
        onnx_manifest = json.loads((folder / ONNX_MANIFEST_COPY).read_text())
        _check_precision(onnx_manifest, folder)
        engines = {m.name: m for m in map(EngineManifest.read, sorted(folder.glob(f"*{ENGINE_MANIFEST_SUFFIX}")))}
        for manifest in engines.values():
            self._check(manifest)
            check_engine_size(manifest, folder / manifest.engine_file)
            entry = onnx_manifest["graphs"].get(manifest.name)
            if entry is not None and manifest.onnx_sha256 != entry["sha256"][entry["file"]]:
                raise EngineMismatchError(f"engine {manifest.engine_file} in {folder} was built from another export "
                                          f"of {manifest.name}; rebuild it: {manifest.rebuild}")
        self._manifests[folder], self._engine_manifests[folder] = onnx_manifest, engines
        self._folders.append(folder)

    def _check(self, manifest: EngineManifest) -> None:
        check_engine(manifest, builder=self.builder, builder_version=self.trt.__version__,
                     gpu_compute_capability=self.gpu_compute_capability)


    def _open_gpu(self) -> None:
        """The CUDA stream and the TensorRT runtime, once; engines already read are checked against
        the GPU's compute capability. On a machine without a GPU: a clear CudaError."""
        if self.stream is not None:
            return
        from ..cuda_mem import CudaGraph, Stream, compute_capability

        stream = Stream()  # raises CudaError naming the missing driver / GPU
        self.gpu_compute_capability = compute_capability()
        for engines in self._engine_manifests.values():
            for manifest in engines.values():
                self._check(manifest)
        self._runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        index = self.device.split(":", 1)[1] if ":" in str(self.device) else "0"
        self._memory_device, self._graph_factory = f"cuda:{index}", CudaGraph
        self.stream = stream

    # ---- engines instead of sessions ------------------------------------------------------------
    def memory_device(self) -> str:
        self._open_gpu()
        return self._memory_device

    def stream_handle(self) -> int:
        self._open_gpu()
        return self.stream.handle

    def _session(self, graph: GraphFile) -> TrtEngine:
        engine = self._sessions.get(graph.path)
        if engine is None:
            engine = self._sessions[graph.path] = self._load_engine(graph)
        return engine

    def _load_engine(self, graph: GraphFile) -> TrtEngine:
        manifest = self._engine_manifests[graph.folder].get(graph.name)
        if manifest is None:
            raise FileNotFoundError(f"{graph.folder} has no engine for {graph.name}: build it with skyrt export "
                                    f"engine --onnx ONNX_DIR --out {graph.folder}")
        self._open_gpu()
        path = graph.folder / manifest.engine_file
        return TrtEngine.deserialize(self.trt, self._runtime, read_engine_bytes(manifest, path), path,
                                     self.stream_handle(), self.memory_device())

    def _run(self, graph: GraphFile, feeds: dict) -> list:
        engine = self._session(graph)
        by_name = dict(zip(engine.outputs, engine.run(feeds)))
        return [by_name[o["name"]] for o in graph.entry["outputs"]]  # manifest order, as onnxruntime gives

    def _run_bound(self, graph: GraphFile, inputs: Mapping[str, Any], outputs: Mapping[str, Any], cache: dict,
                   key: tuple) -> None:
        """The engine on Buffers by address; the KV-cached step through a CUDA graph per key (one per
        active frame count) when cuda_graphs is on, captured at the key's first call."""
        engine = self._session(graph)
        if not (self.cuda_graphs and graph.name in STEP_GRAPHS):
            engine.bind(inputs, outputs)
            engine.enqueue()
            return
        addresses = tuple((n, b.ptr, tuple(b.shape)) for n, b in (*inputs.items(), *outputs.items()))
        captured = cache.get(key)
        if captured is None:
            engine.bind(inputs, outputs)
            engine.enqueue()  # TensorRT needs one plain run after a shape change before a capture
            captured = _CapturedStep(self._graph_factory(self.stream), addresses)
            captured.graph.capture(engine.enqueue)
            cache[key] = captured
            return
        if captured.addresses != addresses:  # the session's buffers never move: this is a bug
            raise RuntimeError(f"{graph.name}: the buffers of step {key} moved since its CUDA graph was captured")
        captured.graph.replay()

    def tiny_decoder_folder(self, latent_h: int, latent_w: int) -> Path:
        """The engine folder of the tiny decoder's step graph for latents h x w: decoder_path's when it is
        an engine folder of it, else built on first use from its ONNX export (itself exported on first
        use) into the engine cache (tiny_decoder.cached_tiny_decoder_engine); its manifest is checked
        against this TensorRT and GPU like every engine's before it loads."""
        folder = self._tiny.folder_for(latent_h, latent_w)
        engines = self._tiny_engines.get(folder)
        if engines is not None:
            return engines
        engines = folder
        if not (folder / f"{tiny_decoder.STEP_GRAPH}{ENGINE_MANIFEST_SUFFIX}").is_file():
            options = self.build_options
            if options is None:  # an engine folder was given: build the decoder as its engines' builder would
                options, _ = artifact_cache.engine_build_options(self.builder, self.cache_root)
            engines = tiny_decoder.cached_tiny_decoder_engine(folder, self.cache_root, options, self.trt.__version__,
                                                              progress=self.progress)
        manifest = EngineManifest.read(engines / f"{tiny_decoder.STEP_GRAPH}{ENGINE_MANIFEST_SUFFIX}")
        self._check(manifest)
        check_engine_size(manifest, engines / manifest.engine_file)
        self._engine_manifests[engines] = {manifest.name: manifest}
        self._tiny_engines[folder] = engines
        return engines


@dataclass
class _CapturedStep:
    """A CUDA graph of one step shape, and the addresses it was captured with."""

    graph: Any
    addresses: tuple

    def close(self) -> None:
        closer = getattr(self.graph, "close", None)
        if closer is not None:
            closer()


__all__ = ["TensorRTBackend", "TrtEngine", "engine_folder_spec"]
