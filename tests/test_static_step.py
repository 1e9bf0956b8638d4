"""The torch backend's fixed-shape KV-cached step and the host logic of its CUDA graphs, on the CPU.

- Equality: every step of each causal preset's stream (all family fixtures: ring evictions, LongLive's
  sink + window and its recache, Rolling-Forcing's window, RoPE rebases, CFG) run both ways on the same
  inputs: the gather of the valid ring slots (the default step) and the whole ring under an additive
  mask over static buffers (export/static_step.py). <= 1e-6 fp32 per step.
- Graph host logic (runtime/step_graphs.py): with a CPU stand-in for torch.cuda.CUDAGraph that records
  warm-ups, captures and replays: one capture per step shape, replays thereafter, a recapture after an
  invalidation or moved buffers, none for a RoPE rebase or a prompt switch; outputs equal the eager
  fixed-shape step's.
- Capturability, checked by the stand-in the way a graph would break: a replay must read exactly the
  memory the capture read (the stand-in re-runs the step and compares the addresses of every tensor the
  step reads that it did not create), and the step must not sync with the host (no .item(), no nonzero).
- No allocation outside the captured step after warm-up: a dispatch-level counter of new tensor
  storages around the session's step, paused inside the (stand-in) graph; the static inputs keep
  their data_ptrs.

NOT a GPU run: torch.cuda graphs do not execute here (benchmarks/gpu_validate.py --mode torch-only).
Run: python -m pytest tests/test_static_step.py -q
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import skyrt
from causal_checkpoints import load_recipes, model_folders
from skyrt.export import torch_backend as tb
from skyrt.export.static_step import FULL
from skyrt.runtime import kvcache
from skyrt.runtime.backends.base import TextContext
from skyrt.runtime.step_graphs import StepGraphs

RECIPES = load_recipes()
SIZE = dict(height=32, width=48)
SMALL_RING = dict(sink_blocks=1, window_blocks=2)  # a 3-slot ring: evictions from the fourth block on
BLOCKS = 8
STEP_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return model_folders(RECIPES, tmp_path_factory)


def load(folders, name: str, **options):
    recipe = RECIPES[name]
    if recipe.get("lora"):
        options.setdefault("lora_alpha", recipe["lora"]["alpha"])
    pipe = skyrt.load(folders[name], preset=recipe["family"], **options)
    contexts: dict = {}

    def encode(prompt):  # a seeded random umT5 context per prompt (no text encoder run)
        if prompt not in contexts:
            rng = np.random.default_rng(len(contexts))
            contexts[prompt] = torch.from_numpy(rng.standard_normal((1, 512, 32), dtype=np.float32))
        return TextContext(prompt, contexts[prompt])

    pipe.backend.encode_text = encode
    return pipe


def stream_blocks(pipe, name: str, blocks: int = BLOCKS, switch: dict | None = None, guidance: float = 1.0,
                  recache: bool = True, **settings) -> np.ndarray:
    """`blocks` clean latent blocks of a stream, prompt switches at the blocks in `switch`."""
    ring = {} if name == "rolling_forcing" else SMALL_RING  # Rolling-Forcing: its own cache policy
    stream = pipe.stream("a", negative_prompt="n", guidance_scale=guidance, output="latent", seed=5,
                         **{**SIZE, **ring, **settings})
    chunks = []
    for blk in range(blocks):
        if switch and blk in switch:
            stream.set_prompt(switch[blk], recache=recache)
        chunks.append(next(stream))
    stream.close()
    return np.concatenate(chunks, axis=1)


# ------------------------------------------------------------------------------------------------
# Equality with the gather, step by step


def _outputs(session, call) -> dict[str, np.ndarray]:
    out = {}
    if call.want_velocity:
        out["velocity"] = session._view("velocity", call.frames).numpy().copy()
    if call.want_kv:
        out["new_k"] = session._view("new_k", call.frames).numpy().copy()
        out["new_v"] = session._view("new_v", call.frames).numpy().copy()
    return out


def ring_view(slot_valid) -> str:
    """What the gather path does for this validity: "all" slots (the whole ring as is), a "prefix"
    (a narrower view: another shape), or a "gather" (index_select: a copy of the valid slots)."""
    index = np.flatnonzero(np.asarray(slot_valid, bool))
    if len(index) == len(slot_valid):
        return "all"
    return "prefix" if len(index) == 0 or index[-1] == len(index) - 1 else "gather"


@pytest.fixture
def both_ways(monkeypatch):
    """Every step of fixed-shape sessions also run as the gather step on the same inputs (first); the
    stream goes on with the fixed-shape outputs. Returns the records: (max |diff|, max |value|, ring_view)."""
    records = []
    real_set, real_step = tb.TorchKVStreamSession.set_prompts, tb.TorchKVStreamSession.step

    def set_prompts(self, contexts):
        real_set(self, contexts)  # the static prompt K/V
        self.backend.fixed_shapes = False
        try:
            real_set(self, contexts)  # the gather path's own (collapsed) prompt K/V
        finally:
            self.backend.fixed_shapes = True

    def step(self, call):
        static, self.static = self.static, None
        real_step(self, call)
        want = _outputs(self, call)
        self.static = static
        real_step(self, call)
        got = _outputs(self, call)
        err = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        scale = max(float(np.abs(want[k]).max()) for k in want)
        records.append((err, scale, ring_view(call.slot_valid)))

    monkeypatch.setattr(tb.TorchKVStreamSession, "set_prompts", set_prompts)
    monkeypatch.setattr(tb.TorchKVStreamSession, "step", step)
    return records


# Every fixture's settings once: causal_forcing_chunkwise samples as self_forcing does (other weights),
# longlive_switch is longlive's checkpoint and config (its switches are run here anyway).
EQUALITY_FIXTURES = ("self_forcing", "causal_forcing_framewise", "causvid", "longlive", "self_forcing_window",
                     "rolling_forcing")
# RoPE tables that rebase within the run (Rolling-Forcing's rebase needs a 40-position table and ~15
# blocks, too long here: test_causal_family.py runs it; none is asked of it here)
ROPE_TABLES = {"causal_forcing_framewise": 5, "rolling_forcing": kvcache.ROPE_TABLE}


@pytest.mark.parametrize("name", EQUALITY_FIXTURES)
def test_fixed_shape_step_equals_the_gather_at_every_step(folders, both_ways, monkeypatch, name):
    """Each preset's stream through a ring that evicts, a RoPE table shrunk so that the cache rebases,
    CFG (batch 2) and a prompt switch with recache (LongLive's chunk recache; Rolling-Forcing's recommit)."""
    monkeypatch.setattr(kvcache, "ROPE_TABLE", ROPE_TABLES.get(name, 15))
    rebases = []
    real_rebase = kvcache.KVCache.rebase
    monkeypatch.setattr(kvcache.KVCache, "rebase", lambda self, s: (rebases.append(s), real_rebase(self, s))[1])
    pipe = load(folders, name, fixed_shapes=True)
    blocks = 8 if name == "rolling_forcing" else 6
    stream_blocks(pipe, name, blocks=blocks, switch={blocks - 2: "b"}, guidance=3.0)
    assert rebases or name == "rolling_forcing"
    views = [view for _, _, view in both_ways]
    err = max(e for e, _, _ in both_ways)
    rel = max(e / max(1.0, scale) for e, scale, _ in both_ways)
    print(f"{name}: {len(both_ways)} steps ({', '.join(f'{v} {views.count(v)}' for v in ('all', 'prefix', 'gather'))}), "
          f"max |fixed - gather| = {err:.2e}, relative to max(1, |value|) {rel:.2e}")
    assert len(both_ways) >= 6 * 2
    assert "prefix" in views  # the ring filled: other shapes for the gather path
    if name == "rolling_forcing":
        assert "gather" in views  # its views leave out slots in front of valid ones: an index_select
    else:
        assert "all" in views  # then the whole ring, evicting from there on
    assert rel <= STEP_TOLERANCE  # values reach ~10 here: 1e-6 absolute would be under one fp32 ulp of them


def test_fixed_shape_stream_equals_the_default_stream(folders):
    """Whole streams, latents after 8 blocks: what accumulates from the per-step rounding differences."""
    ours = stream_blocks(load(folders, "longlive", fixed_shapes=True), "longlive", switch={4: "b"}, guidance=3.0)
    default = stream_blocks(load(folders, "longlive"), "longlive", switch={4: "b"}, guidance=3.0)
    err = np.abs(ours - default).max()
    print(f"longlive, 8 blocks: max |fixed - default| latents {err:.2e} (values up to {np.abs(default).max():.1f})")
    assert err <= 1e-4  # test_causal_family's tolerance against their own code


# ------------------------------------------------------------------------------------------------
# A CPU stand-in for torch.cuda graphs


_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


def _storages(values) -> set[int]:
    """Storage addresses of the tensors among `values` (opaque oneDNN weights have none: skipped)."""
    out = set()
    for t in values:
        if isinstance(t, torch.Tensor):
            try:
                out.add(t.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):
                pass
    return out


class Watch(TorchDispatchMode):
    """Counts new tensor storages (allocations) while not paused; inside `recording()` also records
    the storages each op reads that the recorded code did not create, and host syncs."""

    def __init__(self):
        super().__init__()
        self.allocations = 0
        self.paused = 0
        self.record: dict | None = None

    @contextlib.contextmanager
    def recording(self):
        outer, self.record = self.record, {"external": set(), "created": set(), "syncs": []}
        self.paused += 1
        try:
            yield self.record
        finally:
            self.paused -= 1
            self.record = outer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = _storages(tree_flatten((args, kwargs))[0])
        if self.record is not None:
            if func in _SYNC_OPS:
                self.record["syncs"].append(str(func))
            self.record["external"] |= {p for p in before if p not in self.record["created"]}
        out = func(*args, **kwargs)
        fresh = _storages(tree_flatten(out)[0]) - before
        if self.record is not None:
            self.record["created"] |= fresh
        elif not self.paused:
            self.allocations += len(fresh)
        return out


WATCH: Watch | None = None


def _run_recorded(fn):
    if WATCH is None:
        return fn(), None
    with WATCH.recording() as record:
        out = fn()
    return out, record


class StandInGraph:
    """Captured: the step's outputs and the memory it read. Replay re-runs the step into those outputs
    and fails where a real graph would differ: other memory read, or a host sync."""

    def __init__(self, fn, log: list):
        self.fn, self.log = fn, log
        self.outputs, self.record = _run_recorded(fn)
        self._check(self.record)
        self.closed = False
        self.replays = 0

    @staticmethod
    def _check(record):
        if record is not None:
            assert not record["syncs"], f"the step syncs with the host (a capture would fail): {record['syncs']}"

    def replay(self) -> None:
        assert not self.closed, "replay of a released graph"
        fresh, record = _run_recorded(self.fn)
        self._check(record)
        if record is not None:
            assert record["external"] == self.record["external"], "a replay would read other memory than its capture"
        for static, new in zip(tree_flatten(self.outputs)[0], tree_flatten(fresh)[0]):
            if isinstance(static, torch.Tensor):
                static.copy_(new)
        self.replays += 1
        self.log.append("replay")

    def close(self) -> None:
        self.closed = True


class StandInMechanism:
    """runtime/step_graphs.py's GraphMechanism on the CPU; every instance logs into `instances`."""

    instances: list["StandInMechanism"] = []

    def __init__(self, device):
        self.log: list[str] = []
        self.graphs: list[StandInGraph] = []
        StandInMechanism.instances.append(self)

    def warmup(self, fn):
        self.log.append("warmup")
        return _run_recorded(fn)[0]

    def capture(self, fn):
        self.log.append("capture")
        graph = StandInGraph(fn, self.log)
        self.graphs.append(graph)
        return graph


def graph_backend(pipe, warmup: int = 1):
    """Turn on the CUDA-graph host logic of a CPU torch backend with the stand-in mechanism."""
    backend = pipe.backend
    backend.fixed_shapes, backend.cuda_graphs, backend.graph_warmup = True, True, warmup
    backend.graph_mechanism = StandInMechanism
    return backend


@pytest.fixture
def stand_in():
    StandInMechanism.instances = []
    yield StandInMechanism.instances


# ------------------------------------------------------------------------------------------------
# StepGraphs alone


class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return [torch.full((2,), float(self.calls))]


def test_step_graphs_warm_up_capture_once_per_key_then_replay(stand_in):
    graphs = StepGraphs(StandInMechanism("cpu"), warmup=2)
    fn = _Counting()
    for _ in range(5):
        graphs.run(("a",), fn)
    graphs.run(("b",), fn)
    stats = graphs.stats
    assert (stats[("a",)].eager, stats[("a",)].captures, stats[("a",)].replays) == (2, 1, 3)
    assert (stats[("b",)].eager, stats[("b",)].captures, stats[("b",)].replays) == (1, 0, 0)
    assert stand_in[0].log == ["warmup", "warmup", "capture", "replay", "replay", "replay", "warmup"]
    assert graphs.captured(("a",)) and not graphs.captured(("b",))


def test_step_graphs_start_over_after_an_invalidation_or_moved_buffers(stand_in):
    graphs = StepGraphs(StandInMechanism("cpu"), warmup=0)
    fn = _Counting()
    out = graphs.run("k", fn, addresses=(("ring", 1),))
    assert graphs.run("k", fn, addresses=(("ring", 1),)) is out  # a replay: the same static outputs
    first = stand_in[0].graphs[0]
    graphs.invalidate("test: the prompt buffers changed")
    assert first.closed and not graphs.captured("k")
    graphs.run("k", fn, addresses=(("ring", 1),))
    graphs.run("k", fn, addresses=(("ring", 2),))  # the ring moved: never replayed on the old address
    assert [g.closed for g in stand_in[0].graphs] == [True, True, False]
    assert graphs.invalidations == ["test: the prompt buffers changed",
                                    "step 'k': the buffers it reads moved since its capture"]
    assert graphs.stats["k"].captures == 3
    with pytest.raises(ValueError, match="warmup=-1"):
        StepGraphs(StandInMechanism("cpu"), warmup=-1)


# ------------------------------------------------------------------------------------------------
# The torch session's graphs


def test_torch_session_captures_one_graph_per_step_shape_and_replays_the_eager_result(folders, stand_in, monkeypatch):
    """LongLive, guided, a 3-slot ring, rebases from a shrunk RoPE table, two prompt switches (one with
    its chunk recache). Keys: the block (its denoising steps and its commit pass share one shape) and
    each recache chunk size; a rebase or a prompt switch captures nothing new."""
    global WATCH
    monkeypatch.setattr(kvcache, "ROPE_TABLE", 20)
    rebases = []
    real_rebase = kvcache.KVCache.rebase
    monkeypatch.setattr(kvcache.KVCache, "rebase", lambda self, s: (rebases.append(s), real_rebase(self, s))[1])
    switch = {4: "b", 7: "c"}
    eager = stream_blocks(load(folders, "longlive", fixed_shapes=True), "longlive", blocks=12, switch=switch,
                          guidance=3.0)
    pipe = load(folders, "longlive")
    graph_backend(pipe)
    WATCH = Watch()
    try:
        with WATCH:
            graphed = stream_blocks(pipe, "longlive", blocks=12, switch=switch, guidance=3.0)
    finally:
        WATCH = None
    assert rebases, "the shrunk RoPE table did not rebase"
    assert np.array_equal(graphed, eager)  # the stand-in replays the same arithmetic
    mechanism, = stand_in
    stats = pipe.backend.last_graph_stats
    print({key: (s.eager, s.captures, s.replays) for key, s in stats.items()})
    # the block (its 4 steps and its commit), and LongLive's recache chunks (full attention, 9 and 12 frames)
    assert (3, FULL) in stats and all(attention == FULL for _, attention in stats)
    assert all(s.eager == 1 and s.captures == (1 if s.replays else 0) for s in stats.values())
    assert stats[(3, FULL)].replays == 12 * 5 - 1  # every use after the one warm-up
    assert mechanism.log.count("capture") == sum(s.captures for s in stats.values())
    assert all(g.closed for g in mechanism.graphs)


def test_no_allocation_outside_the_graph_after_warm_up_and_static_inputs_stay(folders, stand_in, monkeypatch):
    """Around the session's step (the stand-in graph's own work paused): nothing allocated after the
    warm-up, across evictions, a rebase and a prompt switch; the static inputs never move."""
    global WATCH
    monkeypatch.setattr(kvcache, "ROPE_TABLE", 20)
    pipe = load(folders, "self_forcing")
    backend = graph_backend(pipe)
    counts, pointers = [], []
    real_step = tb.TorchKVStreamSession.step

    def watched_step(self, call):
        before = WATCH.allocations
        real_step(self, call)
        counts.append(WATCH.allocations - before)
        pointers.append({n: t.data_ptr() for n, t in self.static.static_inputs((call.frames, FULL)).items()})

    monkeypatch.setattr(tb.TorchKVStreamSession, "step", watched_step)
    WATCH = Watch()
    try:
        with WATCH:
            stream_blocks(pipe, "self_forcing", blocks=10, switch={6: "b"}, guidance=3.0, recache=False)
    finally:
        WATCH = None
    warm = 2  # the key's first step allocates its static buffers, the second is its capture
    print(f"allocations per step: first {counts[:warm]}, then max {max(counts[warm:])} over {len(counts) - warm} steps")
    assert counts[0] > 0 and max(counts[warm:]) == 0
    assert all(p == pointers[0] for p in pointers)
    assert backend.last_graph_stats[(3, FULL)].captures == 1


def test_a_new_resolution_is_a_new_stream_with_its_own_graphs(folders, stand_in):
    pipe = load(folders, "self_forcing")
    graph_backend(pipe, warmup=0)
    stream_blocks(pipe, "self_forcing", blocks=2)
    stream_blocks(pipe, "self_forcing", blocks=2, height=48, width=48)
    first, second = stand_in
    assert first.log.count("capture") == 1 and second.log.count("capture") == 1
    assert all(g.closed for g in first.graphs + second.graphs)


def test_cuda_graphs_off_the_gpu_fall_back_to_the_eager_fixed_step_with_a_reason(folders):
    with pytest.warns(RuntimeWarning, match="cuda_graphs=True needs a CUDA device, this backend runs on cpu"):
        pipe = load(folders, "self_forcing", cuda_graphs=True)
    backend = pipe.backend
    assert not backend.cuda_graphs and backend.fixed_shapes and "device='cuda'" in backend.cuda_graphs_off
    with pytest.raises(ValueError, match="cuda_graphs=True needs the fixed-shape step"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            load(folders, "self_forcing", cuda_graphs=True, fixed_shapes=False)


def test_the_stand_in_fails_where_a_real_graph_would():
    """The stand-in's checks can fail: a step that reads memory made outside it anew per call (a replay
    would read the capture's stale copy), and a step that syncs with the host (a capture would fail)."""
    global WATCH
    weights, made = torch.ones(4), []

    def fresh():  # a new host tensor per call, all kept alive (so never at a reused address)
        made.append(torch.from_numpy(np.ones(4, np.float32)))
        return made[-1]

    WATCH = Watch()
    try:
        with WATCH:
            fresh_input = StandInGraph(lambda: weights * fresh(), [])
            with pytest.raises(AssertionError, match="would read other memory than its capture"):
                fresh_input.replay()
            steady = StandInGraph(lambda: weights * 2, [])
            steady.replay()
            with pytest.raises(AssertionError, match="syncs with the host"):
                StandInGraph(lambda: weights * float(weights.sum()), [])
    finally:
        WATCH = None


@pytest.mark.parametrize("window", [dict(ar_step=1, causal_block_size=1)])
def test_window_mode_on_the_fixed_shape_step_equals_the_default(official_dir, window):
    """Window mode's step (no ring) with block-causal attention among the window's frames (its mask
    built once per key) and CFG: the latents of the two steps agree."""
    settings = dict(height=32, width=32, num_inference_steps=3, shift=8.0, guidance_scale=5.0, num_frames=9,
                    base_num_frames=5, overlap_history=1, seed=2, output="latent", progress=False, **window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        default = skyrt.load(official_dir).generate("a red circle", negative_prompt="blurry", **settings)
        fixed = skyrt.load(official_dir, fixed_shapes=True).generate("a red circle", negative_prompt="blurry",
                                                                     **settings)
    err = np.abs(fixed - default).max()
    print(f"window mode {window}: max |fixed - default| = {err:.2e}")
    assert err <= 1e-5


def test_cli_cuda_graphs_flag_reaches_the_backend_or_is_refused():
    from skyrt.runtime.cli import _graph_kwargs, build_parser

    parse = build_parser().parse_args
    assert _graph_kwargs(parse(["serve", "--cuda-graphs", "--device", "cuda"])) == {"cuda_graphs": True}
    assert _graph_kwargs(parse(["generate", "--backend", "tensorrt", "--cuda-graphs"])) == {"cuda_graphs": True}
    assert _graph_kwargs(parse(["serve"])) == {}
    with pytest.raises(SystemExit, match="onnxruntime backend does not capture CUDA graphs"):
        _graph_kwargs(parse(["serve", "--backend", "onnxruntime", "--cuda-graphs"]))
