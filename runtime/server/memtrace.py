"""Opt-in memory tracing of the serving process, for soaks that look for what grows.

Off unless $SKYRT_TRACEMALLOC is set when `skyrt serve` starts (a frame count: how deep each
allocation's traceback is kept, e.g. 8; 0: no tracing, only the object counts and heap figures).
Then `tracemalloc` runs for the life of the process (it costs time and memory on every allocation:
never for production) and GET /debug/memory answers, with the control token only (the same `Authorization: Bearer` check as the control
endpoints; a server without a token refuses it), the allocation sites Python holds now, the
number of live objects per type, and glibc's own view of the heap (mallinfo2: bytes in use vs
bytes held free), which tells a leak of native buffers from heap fragmentation when RSS grows
while Python's objects stay flat.

    SKYRT_TRACEMALLOC=8 SKYRT_TOKEN=t skyrt serve
    curl -H 'Authorization: Bearer t' 'http://127.0.0.1:8000/debug/memory?limit=200'
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import tracemalloc
from collections import Counter

TRACEMALLOC_ENV = "SKYRT_TRACEMALLOC"
DEFAULT_LIMIT = 500  # allocation sites per answer, largest first
MAX_LIMIT = 20000
TYPE_LIMIT = 60  # object types per answer, most numerous first

log = logging.getLogger("skyrt.server")


def start_from_env(environ=os.environ) -> int | None:
    """Start tracemalloc when $SKYRT_TRACEMALLOC names a frame count; the count, or None when off."""
    value = environ.get(TRACEMALLOC_ENV, "").strip()
    if not value:
        return None
    try:
        frames = int(value)
    except ValueError:
        raise ValueError(f"${TRACEMALLOC_ENV}={value!r}: give a traceback depth in frames (e.g. 8), "
                         f"or unset it to leave memory tracing off") from None
    if not 0 <= frames <= 100:
        raise ValueError(f"${TRACEMALLOC_ENV}={frames}: the traceback depth must be 0..100 frames "
                         f"(0: heap figures and object counts only)")
    global _enabled
    _enabled = True
    if frames and not tracemalloc.is_tracing():
        tracemalloc.start(frames)
    log.warning("memory debugging is on ($%s=%d): GET /debug/memory (token) lists what Python holds%s",
                TRACEMALLOC_ENV, frames, "; every allocation is slower" if frames else "")
    return frames


_enabled = False  # set by start_from_env: the debug route exists only then


def _where(frame) -> str:
    """'file:line' with the path shortened to its last three parts (no machine's folders)."""
    parts = frame.filename.replace("\\", "/").split("/")
    return f"{'/'.join(parts[-3:])}:{frame.lineno}"


def allocation_sites(limit: int = DEFAULT_LIMIT) -> dict:
    """The `limit` largest allocation sites (grouped by their whole kept traceback), Python's totals."""
    snapshot = tracemalloc.take_snapshot().filter_traces((
        tracemalloc.Filter(False, tracemalloc.__file__),  # the tracer's own bookkeeping
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
    ))
    stats = snapshot.statistics("traceback")
    current, peak = tracemalloc.get_traced_memory()
    # tracemalloc keeps the oldest frame first; the allocating line first reads better
    sites = [{"where": [_where(f) for f in reversed(stat.traceback)], "size": stat.size, "count": stat.count}
             for stat in stats[:limit]]
    return {"traced_bytes": current, "peak_traced_bytes": peak, "sites_total": len(stats),
            "traced_in_sites": sum(s.size for s in stats), "sites": sites,
            "tracemalloc_overhead_bytes": tracemalloc.get_tracemalloc_memory()}


def object_counts(limit: int = TYPE_LIMIT) -> dict[str, int]:
    """Live objects the garbage collector tracks, per type (module.qualname), most numerous first."""
    counts = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    return dict(counts.most_common(limit))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.lru_cache(maxsize=1)
def _mallinfo2():
    """glibc's mallinfo2, looked up once (a CDLL per call would make ctypes classes per call), or None."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    function.restype = _MallInfo2
    return function


def heap_figures() -> dict | None:
    """glibc's heap: bytes handed out (in_use), held free inside its arenas (free), mmapped blocks
    (mmapped); None off glibc. RSS growing with in_use flat is fragmentation, not a leak."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return {"arena_bytes": info.arena, "mmapped_bytes": info.hblkhd, "mmapped_blocks": info.hblks,
            "in_use_bytes": info.uordblks + info.hblkhd, "free_in_arenas_bytes": info.fordblks,
            "top_releasable_bytes": info.keepcost, "free_chunks": info.ordblks}


def memory_report(limit: int = DEFAULT_LIMIT, types: bool = True) -> dict:
    """What GET /debug/memory answers (see the module docstring)."""
    report = {"tracing": tracemalloc.is_tracing(), "heap": heap_figures(),
              "gc_counts": list(gc.get_count())}
    if report["tracing"]:
        current, peak = tracemalloc.get_traced_memory()
        report |= {"traced_bytes": current, "peak_traced_bytes": peak}
        if limit:  # limit 0: the totals only, no snapshot (cheap enough for every sample)
            report |= allocation_sites(limit)
    if types:
        report["object_types"] = object_counts()
    return report


def add_debug_routes(app, server, authorized, error) -> None:
    """GET /debug/memory on `app` when $SKYRT_TRACEMALLOC was set (never otherwise): token only."""
    if not _enabled:
        return
    import asyncio

    from aiohttp import web

    async def memory(request):
        if server.config.token is None:
            return error(403, "GET /debug/memory needs the control token, and this server runs with --no-token; "
                              "start it with a token (SKYRT_TOKEN or --token-file)")
        if not authorized(request):
            return error(401, "unauthorized: send 'Authorization: Bearer <token>' with the server's token")
        try:
            limit = int(request.query.get("limit", DEFAULT_LIMIT))
        except ValueError:
            return error(400, "limit must be a whole number of allocation sites, e.g. ?limit=200")
        limit = max(0, min(limit, MAX_LIMIT))
        types = request.query.get("types", "1") != "0"
        # A snapshot walks every traced block: off the event loop so streams keep flowing meanwhile.
        return web.json_response(await asyncio.to_thread(memory_report, limit, types),
                                 headers={"Cache-Control": "no-store"})

    app.router.add_get("/debug/memory", memory)
