"""The generator's intra-op thread count (runtime/threads.py): resolved from --threads or the cores,
set in the generator child before the model loads, passed by a fleet stream's actor."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from skyrt.runtime.cli import build_parser, pipeline_spec
from skyrt.runtime.fleet.actors import with_owned_threads
from skyrt.runtime.fleet.config import StreamConfig, parse_stream_config
from skyrt.runtime.server.generator_process import PipelineSpec, ProcessPipeline
from skyrt.runtime.threads import (SERVING_THREADS, ThreadCount, apply_thread_count, backend_thread_options,
                                   resolve_thread_count, usable_cores)


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (8, 7), (64, 63)])
def test_default_is_cores_minus_serving_threads(cores, expected):
    assert SERVING_THREADS == 1
    assert resolve_thread_count(None, cores=cores).count == expected


def test_flag_overrides_and_zero_keeps_library_defaults():
    assert resolve_thread_count(3, cores=2) == ThreadCount(3, "--threads")
    assert resolve_thread_count(0).count is None
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="--threads must be a whole number"):
            resolve_thread_count(bad)


def test_usable_cores_is_the_affinity():
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_apply_sets_every_pool_variable():
    environ = {}
    apply_thread_count(ThreadCount(3, "--threads"), environ)
    assert environ == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3"}
    untouched = {"OMP_NUM_THREADS": "5"}
    apply_thread_count(ThreadCount(None, "library defaults"), untouched)
    assert untouched == {"OMP_NUM_THREADS": "5"}


def test_serve_flags_reach_the_spec():
    parse = build_parser().parse_args
    spec = pipeline_spec(parse(["serve", "--threads", "3", "--backend", "onnxruntime"]))
    assert spec.threads == 3 and spec.options["threads"] == 3  # onnxruntime sizes its own pool
    spec = pipeline_spec(parse(["serve"]))
    assert spec.threads == max(1, usable_cores() - 1) and "threads" not in spec.options
    assert pipeline_spec(parse(["serve", "--threads", "0"])).threads is None
    assert backend_thread_options("tensorrt", ThreadCount(2, "--threads")) == {}


def _torch_default_threads(environ: dict) -> int:
    """torch's own intra-op default in a fresh interpreter with `environ` (the oracle)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=environ,
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def _child_threads(threads: int | None) -> dict:
    pipe = ProcessPipeline(PipelineSpec(None, threads=threads))  # the built-in model on torch-CPU
    try:
        return pipe.start()["threads"]
    finally:
        pipe.stop()


def test_generator_child_sets_threads_before_the_model_loads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    default = _torch_default_threads(dict(os.environ))
    # torch caps its pool at the cores, so 1 is the count that differs from its default on 2+ cores
    assert _child_threads(1) == {"OMP_NUM_THREADS": "1", "torch": 1}
    # --threads 0: the child leaves torch to its own default
    assert _child_threads(None) == {"OMP_NUM_THREADS": None, "torch": default}


def test_fleet_stream_gets_the_cpus_its_actor_owns():
    stream = parse_stream_config({"id": "lobby", "cpus": 2})
    assert with_owned_threads(stream, 2.0).serve["threads"] == 2
    assert with_owned_threads(stream, 0.0).serve["threads"] == 1  # a GPU stream owning no CPU
    own = parse_stream_config({"id": "lobby", "threads": 4})
    assert with_owned_threads(own, 1.0).serve["threads"] == 4  # the stream's own setting wins
    assert "--threads" in StreamConfig("x", {"threads": 4}).serve_argv()
