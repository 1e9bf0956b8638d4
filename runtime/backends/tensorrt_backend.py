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

It is the onnxruntime backend's host logic (tokenizer, float64 time sinusoid, RoPE tables, VAE
cache plumbing, the rollout contract) with every graph call replaced by an engine call:
- engines run with `execute_async_v3` on one CUDA stream; inputs and outputs live in device
  buffers allocated once per shape (cuda-python), host arrays are copied in and out;
- the KV cache lives on the device (`DeviceKVCache`) and is written and rebased in place by the
  skyrt._core.cuda kernels; the step engine reads it by address, never through the host;
- per-prompt cross-attention K/V stay on the device;
- with `cuda_graphs=True` the KV-cached step (static shapes per active-block count) is captured
  once per (frames, cache) and replayed.
Engines built by TensorRT-RTX run through the `tensorrt_rtx` module, others through `tensorrt`.

NOT EXECUTED in skyrt's CI (no GPU there): everything up to opening the GPU is tested
(tests/test_tensorrt_backend.py); benchmarks/gpu_validate.py compares this backend's rollout with
onnxruntime-CPU on the user's machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..engine_manifest import (ENGINE_MANIFEST_SUFFIX, EngineManifest, EngineMismatchError, check_engine,
                               check_engine_size, read_engine_bytes)
from .base import Backend, ModelSpec, TextContext
from .onnxruntime_backend import (OnnxRuntimeBackend, OrtPrompt, _Graph, default_cache_root, export_folder_spec,
                                  is_export_folder, read_manifest)

ONNX_MANIFEST_COPY = "onnx_manifest.json"  # the ONNX export's manifest, copied beside the engines
ENGINE_CACHE = "engines"  # under the cache root
TRT_PRECISIONS = ("fp32", "fp16")  # what the host side feeds and reads (numpy has no bfloat16)


def is_engine_folder(path: str | Path) -> bool:
    return (Path(path) / ONNX_MANIFEST_COPY).is_file() and any(Path(path).glob(f"*{ENGINE_MANIFEST_SUFFIX}"))


def engine_folder_spec(path: str | Path | None) -> ModelSpec:
    """The ModelSpec of what the TensorRT backend is given (the name skyrt.load calls): an engine
    folder (layout 'engines'), an ONNX export folder ('onnx') or a model folder ('official' /
    'diffusers'); None is skyrt's built-in default model."""
    if path is None:
        from ..default_model import default_model_dir

        path = default_model_dir()
    path = Path(path).expanduser()
    if is_engine_folder(path):
        manifest = json.loads((path / ONNX_MANIFEST_COPY).read_text())
        return ModelSpec(path=path, layout="engines", dit_config=manifest["model"]["dit_config"])
    if is_export_folder(path):
        return export_folder_spec(path)
    from ..model_folder import inspect_model_folder

    return inspect_model_folder(path)


def prepare_engine_folder(onnx_dir: Path, engine_dir: Path) -> None:
    """What `skyrt export engine` adds beside the engines: the ONNX manifest, the tokenizer and (for
    the captioner) the token embedding table the host side reads."""
    manifest = json.loads((Path(onnx_dir) / "manifest.json").read_text())
    (Path(engine_dir) / ONNX_MANIFEST_COPY).write_text(json.dumps(manifest, indent=2) + "\n")
    for entry in (manifest.get("tokenizer"), manifest.get("embeddings")):
        name = (entry or {}).get("file")
        if name:
            shutil.copy2(Path(onnx_dir) / name, Path(engine_dir) / name)


def engine_cache_key(onnx_manifest: dict, options, builder_version: str) -> str:
    """What decides whether cached engines fit: the ONNX files' hashes, builder and version, target
    compute capabilities and builder options (BuildOptions)."""
    parts = {
        "onnx": {name: entry["sha256"] for name, entry in sorted(onnx_manifest["graphs"].items())},
        "builder": options.builder, "version": builder_version, "targets": list(options.compute_capabilities),
        "optimization_level": options.optimization_level, "workspace_gib": options.workspace_gib,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def engine_build_options(builder: str, cache_root: Path, compute_capabilities: Sequence[str] | None = None,
                         optimization_level: int = 3):
    """(BuildOptions, builder module) for engines built on first use into the cache under `cache_root`;
    the DiT backend and the captioner share it so both key and build their engines alike."""
    from skyrt.export.engine import BuildOptions, build_targets, import_builder, pick_builder

    builder = pick_builder(builder)
    trt = import_builder(builder)
    # TensorRT-RTX default: every RTX target, not just the GPU present. Measured here: the
    # tiny model's 9 engines take 6.9 s and 44.72 MB for 4 targets vs 6.8 s and 44.71 MB for one,
    # so portability is free and one cache entry serves any RTX GPU.
    timing = None
    if builder == "tensorrt":  # one timing cache per TensorRT version, shared by every build
        timing = Path(cache_root) / ENGINE_CACHE / f"timing-{trt.__version__}.cache"
    options = BuildOptions(builder=builder, optimization_level=optimization_level,
                           compute_capabilities=list(compute_capabilities) if compute_capabilities else None,
                           timing_cache=timing)
    return replace(options, compute_capabilities=build_targets(options)), trt


def cached_engine_folder(onnx_dir: Path, cache_root: Path, options, builder_version: str, prefix: str = "",
                         progress: bool = True) -> Path:
    """The engine folder of an ONNX export in the cache, $SKYRT_CACHE/engines/<builder>-<version>/
    <prefix><key>, built first when absent (the key: engine_cache_key)."""
    manifest = json.loads((Path(onnx_dir) / "manifest.json").read_text())
    key = engine_cache_key(manifest, options, builder_version)
    target = Path(cache_root) / ENGINE_CACHE / f"{options.builder}-{builder_version}" / f"{prefix}{key}"
    return build_engine_folder(Path(onnx_dir), target, options, progress=progress)


def build_engine_folder(onnx_dir: Path, target: Path, options, progress: bool = True) -> Path:
    """Engines for every graph of `onnx_dir` in `target` (built in a staging folder, renamed when
    complete, so an interrupted build never leaves a half folder that looks usable)."""
    from skyrt.export.engine import build_engines, graphs_from_onnx_manifest  # torch-free

    if is_engine_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        build_engines(graphs_from_onnx_manifest(onnx_dir), staging, options, progress=progress, final_dir=target)
        prepare_engine_folder(onnx_dir, staging)
        os.replace(staging, target)
    except OSError:
        if not is_engine_folder(target):  # not "another process finished the same build first"
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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

    def __init__(self, trt, runtime, data: bytes, path: Path, stream, cuda_graphs: bool = False):
        """data: the engine file's bytes, already checked against its manifest (read_engine_bytes)."""
        self.trt, self.stream, self.name = trt, stream, path.stem
        self.engine = runtime.deserialize_cuda_engine(data)
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

    def run(self, feeds: dict, keep_on_device: Sequence[str] = (), out: dict | None = None) -> list:
        """feeds: name -> numpy array (copied in) or DeviceArray (bound by address). Outputs in engine
        order: numpy; fresh DeviceArray copies for `keep_on_device` (the I/O buffers are reused); for
        names in `out` (name -> DeviceArray at least as large), the output is written there and a
        DeviceArray of its shape at that address is returned, without any copy."""
        from ..cuda_mem import DeviceArray

        out = out or {}
        key = []
        for name in self.inputs:
            value = feeds[name]
            shape = tuple(int(d) for d in value.shape)
            if not self.context.set_input_shape(name, shape):
                raise ValueError(f"{self.name}: input {name} of shape {shape} is outside the engine's optimization "
                                 f"profile (see the profile in {self.name}.engine.json)")
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
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if name in out:
                buf = DeviceArray(shape, self.dtypes[name], out[name].ptr)
                if buf.nbytes > out[name].nbytes:
                    raise ValueError(f"{self.name}: output {name} {shape} does not fit its "
                                     f"{out[name].nbytes}-byte buffer")
            else:
                buf = self._buffer(name, shape)
            self.context.set_tensor_address(name, buf.ptr)
            out_buffers.append(buf)
            key.append((name, buf.shape, buf.ptr))
        self._launch(tuple(key))
        results = []
        for name, buf in zip(self.outputs, out_buffers):
            if name in out:
                results.append(buf)
            elif name in keep_on_device:
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


def _check_precision(onnx_manifest: dict, folder: Path) -> None:
    """Refuse graphs whose engines this backend could not feed (before building them)."""
    precision = onnx_manifest.get("precision", "fp32")
    if precision not in TRT_PRECISIONS:
        raise ValueError(f"{folder} holds {precision} graphs; the TensorRT backend runs {' or '.join(TRT_PRECISIONS)} "
                         "(bf16 engines build, but the host side has no bfloat16 arrays yet)")


class TensorRTBackend(OnnxRuntimeBackend):
    """Runs skyrt's engines; given an ONNX export or a model folder, builds them first (module docstring).

    builder: 'auto', 'tensorrt' or 'tensorrt-rtx' (for an engine folder 'auto' means the one that
        built it). precision: of the graphs exported from a model folder ('fp16' or 'fp32').
    compute_capabilities: TensorRT-RTX targets of engines built here (default: every RTX
        generation, export/engine.py RTX_COMPUTE_CAPABILITIES).
    cache_dir: the cache root ($SKYRT_CACHE or ~/.cache/skyrt).
    """

    name = "tensorrt"

    def __init__(self, model: ModelSpec, device: str = "cuda", cuda_graphs: bool = False, builder: str = "auto",
                 precision: str = "fp16", compute_capabilities: Sequence[str] | None = None,
                 optimization_level: int = 3, cache_dir: str | Path | None = None,
                 export_options: dict | None = None, progress: bool = True):
        # Deliberately not OnnxRuntimeBackend.__init__: no onnxruntime sessions; the ONNX export
        # machinery it inherits (_export_group) only needs the attributes set here.
        Backend.__init__(self, model)
        if precision not in TRT_PRECISIONS:
            raise ValueError(f"precision={precision!r}: the TensorRT backend runs {' or '.join(TRT_PRECISIONS)} "
                             "graphs (bf16 engines build, but the host side has no bfloat16 arrays yet)")
        self.device, self.cuda_graphs, self.precision, self.progress = device, cuda_graphs, precision, progress
        self.threads = None
        self.export_options = dict(export_options or {})
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
        self._sessions: dict[Path, Any] = {}
        self._folders: list[Path] = []
        self._manifests: dict[Path, dict] = {}  # engine folder -> its ONNX manifest copy
        self._engine_manifests: dict[Path, dict[str, EngineManifest]] = {}
        self._tokenizer = None
        self.stream = None  # opened with the first engine (_open_gpu)
        self.gpu_compute_capability: str | None = None
        self.source = None
        path = Path(model.path).expanduser()
        if model.layout == "engines" or is_engine_folder(path):
            self._open_engine_folder(path, builder)
        else:
            self._prepare_builds(builder, compute_capabilities, optimization_level)
            if model.layout == "onnx" or is_export_folder(path):
                self._add_folder(self._engines_for(path))
            else:
                from ..text_cache import tree_sha256

                self.source = path  # a model folder: export + build group by group on first use
                self.model_hash = tree_sha256([path], memo_file=self.cache_root / "file-hashes.json")
        self._read_dit_layout(model.dit_config)
        if self._folders:
            self._open_gpu()  # engines to load: without a GPU, fail here rather than at the first prompt

    # ---- where the engines come from --------------------------------------------------------------
    def _open_engine_folder(self, path: Path, builder: str) -> None:
        from skyrt.export.engine import import_builder  # torch-free

        if not is_engine_folder(path):
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
        self.build_options, self.trt = engine_build_options(builder, self.cache_root, compute_capabilities, level)
        self.builder = self.build_options.builder

    def _engines_for(self, onnx_dir: Path) -> Path:
        """The cached engine folder of an ONNX export folder, built first if needed (progress bar)."""
        _check_precision(read_manifest(onnx_dir), onnx_dir)  # before a build whose engines could not run
        return cached_engine_folder(Path(onnx_dir), self.cache_root, self.build_options, self.trt.__version__,
                                    progress=self.progress)

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
        from ..cuda_mem import Stream, compute_capability

        stream = Stream()  # raises CudaError naming the missing driver / GPU
        self.gpu_compute_capability = compute_capability()
        for engines in self._engine_manifests.values():
            for manifest in engines.values():
                self._check(manifest)
        self._runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.stream = stream

    # ---- engines instead of sessions ------------------------------------------------------------
    @property
    def _on_gpu(self) -> bool:
        return True

    def _session(self, graph: _Graph) -> TrtEngine:
        engine = self._sessions.get(graph.path)
        if engine is None:
            manifest = self._engine_manifests[graph.folder].get(graph.name)
            if manifest is None:
                raise FileNotFoundError(f"{graph.folder} has no engine for {graph.name}: build it with skyrt export "
                                        f"engine --onnx ONNX_DIR --out {graph.folder}")
            self._open_gpu()
            path = graph.folder / manifest.engine_file
            engine = TrtEngine(self.trt, self._runtime, read_engine_bytes(manifest, path), path, self.stream,
                               cuda_graphs=self.cuda_graphs and graph.name == "dit_step")
            self._sessions[graph.path] = engine
        return engine

    def _run(self, graph: _Graph, feeds: dict, keep_on_device: Sequence[str] = ()) -> list:
        engine = self._session(graph)
        outputs = engine.run(feeds, keep_on_device)
        by_name = dict(zip(engine.outputs, outputs))
        return [by_name[o["name"]] for o in graph.entry["outputs"]]  # manifest order, as onnxruntime gives

    # ---- the KV cache on the device ---------------------------------------------------------------
    def new_kv_cache(self, layers: int, slots: int, tokens_per_block: int, heads: int, head_dim: int):
        self._open_gpu()
        return DeviceKVCache(layers, slots, tokens_per_block, heads, head_dim, self._cache_dtype(), self.stream)

    def _cache_dtype(self):
        """The step graph's cache dtype; before a model folder's step graph exists (its shapes come
        with the first step), the dtype its export precision will give."""
        graph = self._find("dit_step", {})
        if graph is not None:
            return graph.input_dtype("cache_k")
        return np.float16 if self.precision == "fp16" else np.float32

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


__all__ = ["DeviceKVCache", "TensorRTBackend", "TrtEngine", "build_engine_folder", "cached_engine_folder",
           "engine_build_options", "engine_cache_key", "engine_folder_spec", "is_engine_folder",
           "prepare_engine_folder"]
