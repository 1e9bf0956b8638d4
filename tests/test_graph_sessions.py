"""The GPU backends' host logic for a whole endless stream, on this CPU-only machine.

TensorRT: the real TensorRTBackend (engine folder built by TensorRT-RTX, checked as on a GPU) with
every engine replaced by a stand-in at the TensorRT API level: an onnxruntime session of the same
ONNX graph behind `ICudaEngine` / `IExecutionContext` look-alikes that read and write tensors at the
addresses TrtEngine binds (host memory here: the stream's memory device is "cpu", so the rollout
core and every Buffer live on the host). CUDA graphs are stand-ins that snapshot the bound shapes and
addresses at capture and replay exactly those. onnxruntime: the backend itself on its CPU provider,
whose I/O-binding code is the one the CUDA provider runs (device_type "cpu" instead of "cuda").

Both drive >= 300 schedule rows of a guided (batch-2) stream with two prompt switches (one with a
recache) and a generator restart, and assert: zero allocations after warm-up (skyrt._core.memory_stats
counts every Buffer: the core's, the session's, the VAE caches', the engines' staging), a constant
count of live buffers, everything released on close and allocated again (the same amount) on
restart, one binding / CUDA graph per step shape. The frames equal the onnxruntime backend's.

NOT a GPU run: the engines, CUDA graphs and CUDA kernels do not execute here (benchmarks/gpu_validate.py).
Run: python -m pytest tests/test_graph_sessions.py -q
"""
from __future__ import annotations

import ctypes
import re
import warnings

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
trt_rtx = pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")

from skyrt import _core  # noqa: E402
from skyrt.runtime import kvcache  # noqa: E402
from skyrt.runtime.backends import onnxruntime_backend as ob  # noqa: E402
from skyrt.runtime.backends import tensorrt_backend as tb  # noqa: E402
from skyrt.runtime.pipeline import Pipeline  # noqa: E402

PROFILE = dict(height=32, width=32, block_frames=1, cache_blocks=3, max_active_blocks=2, window_frames=5)
# Endless, guided (cond + uncond as one batch-2 call), 2 blocks in flight, a 3-slot ring: evictions.
STREAM = dict(height=32, width=32, num_inference_steps=4, shift=8.0, mode="kvcache", ar_step=2,
              causal_block_size=1, sink_blocks=1, window_blocks=2, guidance_scale=5.0, seed=3)
WARMUP_CHUNKS = 6  # both step shapes (F = 1 and 2 frames), the commit and the VAE's two graphs seen
ROWS = 300


@pytest.fixture(scope="module")
def onnx_dir(official_dir, tmp_path_factory):
    from skyrt.export.onnx_export import OnnxProfile, export_onnx

    out = tmp_path_factory.mktemp("sessions-onnx")
    export_onnx(official_dir, out, OnnxProfile(**PROFILE), progress=False)
    return out


@pytest.fixture(scope="module")
def engine_dir(onnx_dir, tmp_path_factory):
    from skyrt.export.engine import BuildOptions, write_engine_folder

    out = tmp_path_factory.mktemp("sessions-engines")
    write_engine_folder(onnx_dir, out, BuildOptions(builder="tensorrt-rtx"), progress=False)
    return out


# ----------------------------------------------------------------------------------------------
# TensorRT API stand-ins over onnxruntime and host memory

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bool)": np.bool_,
              "tensor(int64)": np.int64}


def host_array(ptr: int, shape, dtype) -> np.ndarray:
    """The host memory at `ptr` as an array (what a device pointer is in this test)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape)) * dtype.itemsize
    raw = np.ctypeslib.as_array((ctypes.c_ubyte * max(count, 1)).from_address(ptr))[:count]
    return raw.view(dtype).reshape(shape)


class FakeTrt:
    """The few names of the tensorrt module that TrtEngine uses."""

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    @staticmethod
    def nptype(dtype):
        return dtype


class OrtEngine:
    """ICudaEngine look-alike over an onnxruntime session of the engine's ONNX graph."""

    def __init__(self, session, name: str):
        self.session, self.name = session, name
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.outputs = {o.name: o for o in session.get_outputs()}
        self.names = [*self.inputs, *self.outputs]
        self.executions = 0

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return FakeTrt.TensorIOMode.INPUT if name in self.inputs else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return _ORT_TYPES[(self.inputs.get(name) or self.outputs[name]).type]

    def create_execution_context(self) -> "OrtContext":
        return OrtContext(self)


class OrtContext:
    """IExecutionContext look-alike: shapes and addresses set per tensor, execute reads the inputs at
    their addresses and writes the outputs at theirs (shapes must be what the graph computes)."""

    def __init__(self, engine: OrtEngine):
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self._output_shapes: dict[tuple, dict] = {}

    def set_input_shape(self, name: str, shape) -> bool:
        declared = self.engine.inputs[name].shape
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(declared) or any(isinstance(d, int) and d != s for d, s in zip(declared, shape)):
            return False  # outside the "profile": a static axis differs
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_shape(self, name: str):
        if name in self.engine.inputs:
            return self.shapes[name]
        key = tuple(sorted(self.shapes.items()))
        if key not in self._output_shapes:  # shapes follow from input shapes: learn them once per signature
            feeds = {n: np.zeros(s, _ORT_TYPES[self.engine.inputs[n].type]) for n, s in self.shapes.items()}
            outs = self.engine.session.run(list(self.engine.outputs), feeds)
            self._output_shapes[key] = {n: o.shape for n, o in zip(self.engine.outputs, outs)}
        return self._output_shapes[key][name]

    def state(self) -> tuple[dict, dict]:
        return dict(self.shapes), dict(self.addresses)

    def execute_async_v3(self, stream: int, state: tuple[dict, dict] | None = None) -> bool:
        shapes, addresses = state or self.state()
        types = {n: _ORT_TYPES[i.type] for n, i in self.engine.inputs.items()}
        feeds = {n: host_array(addresses[n], shapes[n], types[n]).copy() for n in self.engine.inputs}
        outs = self.engine.session.run(list(self.engine.outputs), feeds)
        for name, value in zip(self.engine.outputs, outs):
            host_array(addresses[name], value.shape, value.dtype)[...] = value
        self.engine.executions += 1
        return True


class RecordingGraph:
    """CUDA graph stand-in: capture records the bound state (nothing runs), replay runs exactly it."""

    captured: list["RecordingGraph"] = []

    def __init__(self, stream):
        self.closed = False
        self.replays = 0

    def capture(self, launch) -> None:
        self.context = launch.__self__.context  # TrtEngine.enqueue
        self.snapshot = self.context.state()
        RecordingGraph.captured.append(self)

    def replay(self) -> None:
        assert not self.closed, "replay of a released CUDA graph"
        self.replays += 1
        self.context.execute_async_v3(0, self.snapshot)

    def close(self) -> None:
        self.closed = True


class _Stream:
    handle = 0


def trt_backend_on_host(engine_dir, onnx_dir, monkeypatch, **options) -> tb.TensorRTBackend:
    """The TensorRTBackend of `engine_dir` whose GPU is host memory and whose engines are stand-ins
    (options: the backend's, e.g. decoder="tiny")."""
    import onnxruntime as ort

    from skyrt.runtime.tiny_decoder import STEP_GRAPH, read_tiny_export

    manifest = ob.read_manifest(onnx_dir)

    def open_gpu(self):
        if self.stream is None:
            self.stream, self._memory_device, self._graph_factory = _Stream(), "cpu", RecordingGraph

    def load_engine(self, graph):
        self._open_gpu()
        if graph.name == STEP_GRAPH:  # the tiny decoder's engine: built from its own export folder
            path = self._tiny.folder_for(*read_tiny_export(graph.folder)["latent"]) / graph.entry["file"]
        else:
            path = onnx_dir / manifest["graphs"][graph.name]["file"]  # the graph the engine was built from
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return tb.TrtEngine(FakeTrt, OrtEngine(session, graph.name), 0, graph.name, "cpu")

    monkeypatch.setattr(tb.TensorRTBackend, "_open_gpu", open_gpu)
    monkeypatch.setattr(tb.TensorRTBackend, "_load_engine", load_engine)
    return tb.TensorRTBackend(tb.engine_folder_spec(engine_dir), cuda_graphs=True, **options)


# ----------------------------------------------------------------------------------------------
# One endless stream, watched


def _stats() -> tuple[int, int]:
    s = _core.memory_stats()
    return s["allocations"], s["live"]


def run_watched_stream(pipe: Pipeline, monkeypatch, rows: int = ROWS, stream: dict = STREAM,
                       warmup_recache: int | None = None) -> dict:
    """Stream until `rows` schedule rows ran, switching the prompt twice, then restart the generator
    and stream again; records allocations and live buffers around every chunk. warmup_recache: a chunk
    (before the warm-up ends) where a prompt switch with recache runs once, so that the recache's graph
    (a preset's dit_step_full) is part of the warm-up too."""
    counted = {"rows": 0}
    run_row = kvcache.KVRollout._run_row

    def counting_run_row(self, plan):
        counted["rows"] += 1
        return run_row(self, plan)

    monkeypatch.setattr(kvcache.KVRollout, "_run_row", counting_run_row)
    report: dict = {"before": _stats()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # kvcache on a bidirectional checkpoint warns
        first = pipe.stream("a red circle bouncing", **stream)
        chunks, after_warmup = [], None
        while counted["rows"] < rows:
            chunks.append(next(first))
            if len(chunks) == warmup_recache:
                first.set_prompt("a red circle bouncing", recache=True)
            if len(chunks) == WARMUP_CHUNKS:
                after_warmup = _stats()
            elif len(chunks) > WARMUP_CHUNKS:
                assert _stats() == after_warmup, f"allocation after warm-up, at chunk {len(chunks)}"
            if len(chunks) == 40:
                first.set_prompt("a blue square sliding", recache=True)
            if len(chunks) == 90:
                first.set_prompt("green waves", "grainy")
        report.update(first_chunks=chunks, rows=counted["rows"], after_warmup=after_warmup, live_streaming=_stats())
        first.close()
        report["after_close"] = _stats()
        second = pipe.stream("a red circle bouncing", **stream)  # the restart
        again = [next(second) for _ in range(WARMUP_CHUNKS)]
        report["restart_warm"] = _stats()
        again += [next(second) for _ in range(20)]
        report["restart_later"] = _stats()
        second.close()
        report.update(restart_chunks=again, after_restart_close=_stats())
    return report


def check_allocation_discipline(report: dict) -> None:
    allocs_warm, live_warm = report["after_warmup"]
    assert report["rows"] >= ROWS
    assert report["live_streaming"] == report["after_warmup"]  # nothing allocated over >= 300 rows
    allocs_closed, live_closed = report["after_close"]
    stream_buffers = live_warm - live_closed
    assert allocs_closed == allocs_warm and stream_buffers > 0  # close frees, allocates nothing
    # The restart allocates the same buffers again (no more), then nothing; its close frees them all.
    allocs_restart, live_restart = report["restart_warm"]
    assert live_restart == live_warm and allocs_restart == allocs_closed + stream_buffers
    assert report["restart_later"] == report["restart_warm"]
    assert report["after_restart_close"] == (allocs_restart, live_closed)


# ----------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def ort_frames(onnx_dir):
    """The onnxruntime backend's first chunks of the same stream (the reference for the stand-ins)."""
    pipe = Pipeline(ob.OnnxRuntimeBackend(ob.export_folder_spec(onnx_dir)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return list(pipe.stream("a red circle bouncing", **STREAM, max_chunks=12))


def test_tensorrt_host_logic_allocates_nothing_after_warmup(engine_dir, onnx_dir, ort_frames, monkeypatch):
    RecordingGraph.captured = []
    backend = trt_backend_on_host(engine_dir, onnx_dir, monkeypatch)
    report = run_watched_stream(Pipeline(backend), monkeypatch)
    check_allocation_discipline(report)
    print(f"rows {report['rows']}, live buffers while streaming {report['after_warmup'][1]}, "
          f"freed at close {report['after_warmup'][1] - report['after_close'][1]}")
    # Frames: the engines' graphs on the bound buffers give what onnxruntime gives (uint8, one level:
    # the ORT backend runs dit_step's CPU variant, the engines the plain graph).
    for got, want in zip(report["first_chunks"][:12], ort_frames):
        assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    for got, want in zip(report["restart_chunks"][:12], ort_frames):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # a restart starts the same stream again
    # One CUDA graph per step shape (F = 1, 2 frames) and stream; the first stream's released at close.
    graphs = RecordingGraph.captured
    assert len(graphs) == 4 and [g.closed for g in graphs] == [True] * 4
    assert sum(g.replays for g in graphs) >= report["rows"]
    # Every step read the core's ring and wrote the core's velocity: bound once per shape, never moved.
    steps = {g.snapshot[1]["cache_k"] for g in graphs[:2]}
    assert len(steps) == 1


def test_tensorrt_window_mode_runs_the_window_step_graph_on_bound_buffers(engine_dir, onnx_dir, monkeypatch):
    """Window mode on the TensorRT host logic: the dit_window engine (the DiT step without cache inputs)
    on the window core's buffers, one batch-2 call (cond and uncond) per schedule row, gives the
    onnxruntime backend's latents (its ORT-CPU variant of the same graph) to fp32 tolerance."""
    from skyrt.runtime.backends import exported_graphs as eg

    backend = trt_backend_on_host(engine_dir, onnx_dir, monkeypatch)
    steps = []
    real_step = eg.GraphKVStreamSession.step

    def counted_step(self, call):
        steps.append(self.step_graph.name)
        return real_step(self, call)

    monkeypatch.setattr(eg.GraphKVStreamSession, "step", counted_step)
    window = dict(height=32, width=32, num_inference_steps=4, shift=8.0, guidance_scale=5.0, num_frames=17,
                  base_num_frames=9, overlap_history=5, overlap_carry="latent", ar_step=1, seed=2, output="latent",
                  progress=False)
    pipe = Pipeline(backend)
    got = pipe.generate("a red circle bouncing", negative_prompt="blurry", **window)
    want = Pipeline(ob.OnnxRuntimeBackend(ob.export_folder_spec(onnx_dir))).generate(
        "a red circle bouncing", negative_prompt="blurry", **window)
    print(f"window mode, TensorRT host logic vs onnxruntime: max diff {np.abs(got - want).max():.2e}")
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
    engines = {engine.name: engine for engine in backend._sessions.values()}
    trt_steps = steps[:len(steps) // 2]  # the TensorRT pipeline's (the onnxruntime run came second)
    assert set(trt_steps) == {"dit_window"} and len(trt_steps) > 4  # every row of both windows
    assert engines["dit_window"].context.engine.executions == len(trt_steps)  # one batch-2 call per row
    assert {i.name for i in engines["dit_window"].context.engine.session.get_inputs()}.isdisjoint(
        {"cache_k", "cache_v", "slot_valid"})


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A taew2_1.pth in TAEHV's released layout with the seeded weights of tests/tiny_vae_reference.py."""
    import json

    import torch

    from tiny_vae_reference import FIXTURE, seeded_state

    info = json.loads(str(np.load(FIXTURE)["info"]))
    state = seeded_state({k: tuple(s) for k, s in info["keys"].items()})
    path = tmp_path_factory.mktemp("taehv") / "taew2_1.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return path


def test_tensorrt_tiny_decoder_builds_on_first_use_and_carries_its_memories(engine_dir, onnx_dir, tiny_weights,
                                                                          tmp_path, monkeypatch):
    """decoder="tiny" on the TensorRT host logic: the step graph is exported and built (TensorRT-RTX, for
    real) into the cache at the first frame, then run latent by latent on the stand-in engine with its 9
    memories carried in the two bound buffer sets: == torch's whole-clip decode of the same weights; a
    second stream starts from zero memories; nothing is allocated after the first frame; a second backend
    reuses the cached engine. (The engine itself does not execute here: no GPU.)"""
    import subprocess

    import torch

    from skyrt.export import engine as engine_module
    from skyrt.export.tiny_vae import decode_raw, load_tiny_decoder
    from skyrt.runtime.engine_manifest import EngineManifest, file_sha256

    options = dict(decoder="tiny", decoder_path=tiny_weights, cache_dir=tmp_path, progress=False)
    backend = trt_backend_on_host(engine_dir, onnx_dir, monkeypatch, **options)
    mu = np.random.default_rng(0).standard_normal((16, 4, 4, 4)).astype(np.float32)  # raw latents [16, T, h, w]
    with torch.no_grad():
        whole = decode_raw(load_tiny_decoder(tiny_weights), torch.from_numpy(mu)[None])[0].numpy()  # [3, 13, 32, 32]
    decoder = backend.streaming_decoder()
    chunks = [decoder.decode_next(mu[:, :1])]
    after_first = _stats()
    chunks += [decoder.decode_next(mu[:, t:t + 1]) for t in range(1, mu.shape[1])]
    assert _stats() == after_first  # frames 2..T: no allocation, nothing more alive
    assert [c.shape[1] for c in chunks] == [1, 4, 4, 4]
    err = float(np.abs(np.concatenate(chunks, 1) - whole).max())
    print(f"tiny decoder on the TensorRT host logic vs torch whole clip: {err:.2e}")
    assert err <= 1e-4
    decoder.reset()
    again = np.concatenate([decoder.decode_next(mu[:, t:t + 1]) for t in range(mu.shape[1])], 1)
    assert np.abs(again - whole).max() <= 1e-4  # zero memories again, not the last stream's
    (engines,) = backend._tiny_engines.values()
    manifest = EngineManifest.read(engines / "tiny_decoder_step.engine.json")
    source = backend._tiny.folder_for(4, 4) / "tiny_decoder_step.onnx"
    assert manifest.builder == "tensorrt-rtx" and manifest.onnx_sha256 == file_sha256(source)
    assert (engines / manifest.engine_file).stat().st_size == manifest.engine_bytes > 10_000
    decoder.close()

    def fail(*args, **kwargs):
        raise AssertionError("exported or built again")

    monkeypatch.setattr(subprocess, "run", fail)  # the tiny decoder's ONNX export runs in a subprocess
    monkeypatch.setattr(engine_module, "build_engines", fail)
    reused = trt_backend_on_host(engine_dir, onnx_dir, monkeypatch, **options).streaming_decoder()
    assert np.abs(reused.decode_next(mu[:, :1]) - whole[:, :1]).max() <= 1e-4
    reused.close()


def test_onnxruntime_binding_logic_allocates_nothing_after_warmup(onnx_dir, ort_frames, monkeypatch):
    backend = ob.OnnxRuntimeBackend(ob.export_folder_spec(onnx_dir))
    bindings = []
    real_bound = ob._Bound

    def recording_bound(*args):
        bound = real_bound(*args)
        bindings.append(bound)
        return bound

    monkeypatch.setattr(ob, "_Bound", recording_bound)
    report = run_watched_stream(Pipeline(backend), monkeypatch)
    check_allocation_discipline(report)
    for got, want in zip(report["first_chunks"][:12], ort_frames):
        assert np.array_equal(got, want)  # the same backend: bit for bit
    # Bindings per stream: cross_kv, dit_step at F = 1 and 2, the VAE's first graph (reading cache set 0)
    # and its step graph reading either set; the switches and the recache bind nothing new.
    assert len(bindings) == 2 * (1 + 2 + 3)


class _RecordingSession:
    """An onnxruntime session stand-in that records what gets bound (no CUDA here)."""

    def __init__(self):
        self.binds, self.runs = [], 0

    def io_binding(self):
        session = self

        class Binding:
            def bind_input(self, *args):
                session.binds.append(("in", *args))

            def bind_output(self, *args):
                session.binds.append(("out", *args))

            def clear_binding_inputs(self):
                pass

            def clear_binding_outputs(self):
                pass

        return Binding()

    def run_with_iobinding(self, binding):
        self.runs += 1


def test_onnxruntime_cuda_binds_device_buffers_by_address_once(onnx_dir, monkeypatch):
    """What the CUDA provider is handed: every Buffer as device memory ("cuda", id) at its address,
    with its dtype and shape; a second run with the same buffers binds nothing again; a moved buffer
    binds anew (the key never stands for an address)."""
    backend = ob.OnnxRuntimeBackend(ob.export_folder_spec(onnx_dir))
    session = _RecordingSession()
    monkeypatch.setattr(backend, "_session", lambda graph: session)
    graph = backend._graph("cross_kv")
    device_base = 0x7F0000000000  # addresses on "cuda:1": never dereferenced here
    context = _core.Buffer.wrap(device_base, [2, 16, 32], "float32", "cuda:1")
    k = _core.Buffer.wrap(device_base + 4096, [2, 2, 16, 2, 16], "float32", "cuda:1")
    v = _core.Buffer.wrap(device_base + 65536, [2, 2, 16, 2, 16], "float16", "cuda:1")
    cache: dict = {}
    backend._run_bound(graph, {"context": context}, {"cross_k": k, "cross_v": v}, cache, ("cross_kv",))
    assert session.binds == [
        ("in", "context", "cuda", 1, np.float32, [2, 16, 32], device_base),
        ("out", "cross_k", "cuda", 1, np.float32, [2, 2, 16, 2, 16], device_base + 4096),
        ("out", "cross_v", "cuda", 1, np.float16, [2, 2, 16, 2, 16], device_base + 65536)]
    backend._run_bound(graph, {"context": context}, {"cross_k": k, "cross_v": v}, cache, ("cross_kv",))
    assert len(session.binds) == 3 and session.runs == 2
    moved = _core.Buffer.wrap(device_base + 8192, [2, 2, 16, 2, 16], "float32", "cuda:1")
    backend._run_bound(graph, {"context": context}, {"cross_k": moved, "cross_v": v}, cache, ("cross_kv",))
    assert len(session.binds) == 6 and session.binds[4][-1] == device_base + 8192


def test_trt_engine_refuses_buffers_of_the_wrong_shape_dtype_or_device(onnx_dir):
    import onnxruntime as ort

    from skyrt.runtime.backends.exported_graphs import graph_io_shape

    entry = ob.read_manifest(onnx_dir)["graphs"]["cross_kv"]
    engine = tb.TrtEngine(FakeTrt, OrtEngine(ort.InferenceSession(str(onnx_dir / entry["file"]),
                                                                   providers=["CPUExecutionProvider"]), "cross_kv"),
                          0, "cross_kv", "cpu")
    context_shape = graph_io_shape(entry["inputs"][0], {"batch": 1})  # [1, Lt, text_dim]
    cross_shape = graph_io_shape(entry["outputs"][0], {"batch": 1})  # [layers, 1, Lt, heads, head_dim]
    alloc = lambda shape, dtype="float32": _core.Buffer.allocate(shape, dtype, "cpu")  # noqa: E731
    good = {"context": alloc(context_shape)}
    outs = {"cross_k": alloc(cross_shape), "cross_v": alloc(cross_shape)}
    engine.bind(good, outs)
    wrong = [cross_shape[0], 2, *cross_shape[2:]]
    with pytest.raises(ValueError, match=re.escape(f"output cross_k is {tuple(cross_shape)}, its buffer") + ".*"
                       + re.escape(str(wrong))):
        engine.bind(good, {**outs, "cross_k": alloc(wrong)})
    with pytest.raises(ValueError, match="input context needs float32 on cpu, got .*float16"):
        engine.bind({"context": alloc(context_shape, "float16")}, outs)
    with pytest.raises(ValueError, match="input context of shape .* is outside the engine's optimization profile"):
        engine.bind({"context": alloc([1, context_shape[1] + 1, context_shape[2]])}, outs)
    with pytest.raises(ValueError, match=r"no buffer for output cross_v \(given: \['cross_k'\]\)"):
        engine.bind(good, {"cross_k": outs["cross_k"]})


# ----------------------------------------------------------------------------------------------
# A causal-family preset's export (export/preset_export.py): dit_step and dit_step_full

PRESET = "longlive"
PRESET_RING = dict(sink_blocks=1, window_blocks=2)
# Guided (batch 2), a 3-slot ring, LongLive's chunk recache (dit_step_full) once in the warm-up.
PRESET_STREAM = dict(height=32, width=48, guidance_scale=3.0, seed=3, **PRESET_RING)
PRESET_WARMUP_RECACHE = 4  # the ring is full by then: the recache chunk has its steady size


@pytest.fixture(scope="module")
def preset_onnx_dir(tmp_path_factory):
    from causal_checkpoints import load_recipes, write_model_folder
    from skyrt.export.preset_export import export_preset_onnx

    recipe = load_recipes()["longlive"]
    folder = write_model_folder(recipe, tmp_path_factory.mktemp("preset-model") / "model")
    out = tmp_path_factory.mktemp("preset-onnx")
    export_preset_onnx(folder, out, PRESET, height=32, width=48, progress=False, lora_alpha=recipe["lora"]["alpha"],
                       **PRESET_RING)
    return out


@pytest.fixture(scope="module")
def preset_engine_dir(preset_onnx_dir, tmp_path_factory):
    """Every graph of the preset's export built by TensorRT-RTX (fp32, ahead of time, no GPU)."""
    from skyrt.export.engine import BuildOptions, write_engine_folder

    out = tmp_path_factory.mktemp("preset-engines")
    write_engine_folder(preset_onnx_dir, out, BuildOptions(builder="tensorrt-rtx"), progress=False)
    return out


def preset_pipe(backend) -> Pipeline:
    from skyrt.runtime.causal_family import PRESETS

    return Pipeline(backend, preset=PRESETS[PRESET])


@pytest.fixture(scope="module")
def preset_ort_frames(preset_onnx_dir):
    pipe = preset_pipe(ob.OnnxRuntimeBackend(ob.export_folder_spec(preset_onnx_dir)))
    return list(pipe.stream("a red circle bouncing", **PRESET_STREAM, max_chunks=8))


def test_preset_onnxruntime_binding_logic_allocates_nothing_after_warmup(preset_onnx_dir, preset_ort_frames,
                                                                         monkeypatch):
    backend = ob.OnnxRuntimeBackend(ob.export_folder_spec(preset_onnx_dir))
    graphs = []
    real_run_bound = backend._run_bound
    monkeypatch.setattr(backend, "_run_bound", lambda graph, *a: (graphs.append(graph.name), real_run_bound(graph, *a))[1])
    report = run_watched_stream(preset_pipe(backend), monkeypatch, stream=PRESET_STREAM,
                                warmup_recache=PRESET_WARMUP_RECACHE)
    check_allocation_discipline(report)
    assert graphs.count("dit_step_full") >= 2  # the warm-up's recache and the one at chunk 40
    for got, want in zip(report["first_chunks"][:PRESET_WARMUP_RECACHE], preset_ort_frames):
        assert np.array_equal(got, want)  # the same backend: bit for bit until the watched run's recache
    for got, want in zip(report["restart_chunks"], preset_ort_frames):
        assert np.array_equal(got, want)  # a restart starts the same stream again


def test_preset_tensorrt_host_logic_allocates_nothing_after_warmup(preset_engine_dir, preset_onnx_dir,
                                                                   preset_ort_frames, monkeypatch):
    RecordingGraph.captured = []
    backend = trt_backend_on_host(preset_engine_dir, preset_onnx_dir, monkeypatch)
    report = run_watched_stream(preset_pipe(backend), monkeypatch, stream=PRESET_STREAM,
                                warmup_recache=PRESET_WARMUP_RECACHE)
    check_allocation_discipline(report)
    for got, want in zip(report["restart_chunks"], preset_ort_frames):
        assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # CUDA graphs: dit_step (a step and a commit: both one block, one shape) and dit_step_full's recache
    # chunk, per stream; every one released when its stream closed.
    names = sorted({g.context.engine.name for g in RecordingGraph.captured})
    assert "dit_step" in names and "dit_step_full" in names
    assert all(g.closed for g in RecordingGraph.captured)
    # One capture per step shape and stream, replays thereafter: dit_step has one shape (a block), and each
    # of the two streams (first run, restart) captured it once and replayed it at every later step and commit.
    step_graphs = [g for g in RecordingGraph.captured if g.context.engine.name == "dit_step"]
    assert len(step_graphs) == 2
    assert len({tuple(sorted(g.snapshot[0].items())) for g in step_graphs}) == 1  # the same shapes both times
    assert step_graphs[0].replays >= report["rows"]  # every row of the first stream after its capture
