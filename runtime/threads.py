"""How many intra-op threads the generator's math libraries use (torch, OpenMP, MKL, onnxruntime).

Left alone, torch and onnxruntime start one worker per core. `skyrt serve` is never alone on its
cores: the serving process (pacer, encoders, HTTP) runs beside the generator, and on a shared host so
do other tenants. OpenMP workers that outnumber the free cores wait for each other at every barrier
of every small op; on a busy 2-core host the default threads made 2.1 generated fps where one thread
made 72 (benchmarks/fleet.py; benchmarks/threads.py measures it under 0 / 4 / 8 busy processes).

So the generator process sets its own count before the model loads:
    --threads N   N threads; 0 leaves the libraries' own defaults (the behaviour before this flag)
    (not given)   cores this process may run on, minus SERVING_THREADS, at least 1
A fleet stream passes the CPUs its Ray actor owns (runtime/fleet/actors.py), and a fleet GPU worker
(runtime/fleet/gpu_worker.py) sets its own process's count from the CPUs Ray gave it (`owned_thread_count`).

torch reads OMP_NUM_THREADS when it is first imported, which in the generator child happens while
the model loads, after `apply_thread_count`; a torch already imported is set through its own call,
reached through `sys.modules` (this module is torch-free: it never imports torch).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

# Cores the serving process keeps busy beside the generator: one interpreter (pacer, encoders and the
# HTTP event loop share its lock), so about one core at most.
SERVING_THREADS = 1
# The variables OpenMP, MKL and OpenBLAS read for their pool sizes (torch's intra-op pool is OpenMP's).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ThreadCount:
    """The intra-op thread count the generator uses. count None: the libraries' defaults."""

    count: int | None
    source: str  # "--threads", "cores - serving threads", "library defaults"

    def describe(self) -> str:
        if self.count is None:
            return "intra-op threads: the libraries' defaults (--threads 0)"
        return f"intra-op threads: {self.count} ({self.source})"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_thread_count(requested: int | None, cores: int | None = None) -> ThreadCount:
    """The thread count for `--threads requested` (None: not given) on `cores` usable cores."""
    if requested is None:
        cores = usable_cores() if cores is None else cores
        return ThreadCount(max(1, cores - SERVING_THREADS), "cores - serving threads")
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"--threads must be a whole number >= 0 (0: the libraries' defaults), got {requested!r}")
    if requested == 0:
        return ThreadCount(None, "library defaults")
    return ThreadCount(requested, "--threads")


def owned_thread_count(assigned_cpus: float | None) -> ThreadCount:
    """The count for a process that owns `assigned_cpus` CPUs (a Ray actor's share): the whole CPUs it
    owns, at least one (a GPU actor may own none; a fraction is less than a core)."""
    return ThreadCount(max(1, int(assigned_cpus or 0)), "CPUs the actor owns")


def threads_in_use() -> dict:
    """What this process's libraries run with: OMP_NUM_THREADS and torch's intra-op threads (None while
    torch is not loaded): what /status reports."""
    torch = sys.modules.get("torch")
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "torch": None if torch is None else torch.get_num_threads()}


def apply_thread_count(threads: ThreadCount, environ=os.environ) -> None:
    """Set the count for this process's math libraries; call before they load (the generator child
    does, before the model loads). Nothing changes for the libraries' defaults."""
    if threads.count is None:
        return
    for name in THREAD_VARIABLES:
        environ[name] = str(threads.count)
    torch = sys.modules.get("torch")  # already loaded: its pool has read the environment already
    if torch is not None:
        torch.set_num_threads(threads.count)


def backend_thread_options(backend: str, threads: ThreadCount) -> dict:
    """Backend keywords carrying the count: onnxruntime sizes its own pool (intra_op_num_threads),
    the others read the environment (torch) or run on the GPU (TensorRT)."""
    if backend == "onnxruntime" and threads.count is not None:
        return {"threads": threads.count}
    return {}
