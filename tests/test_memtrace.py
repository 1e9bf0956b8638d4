"""The serving process's opt-in memory debugging (runtime/server/memtrace.py): off unless
$SKYRT_TRACEMALLOC is set, and then GET /debug/memory answers only with the control token.

The route is checked on a bare aiohttp app around `add_debug_routes` (what create_app calls), so no
stream runs here; what a snapshot lists is checked against allocations this test makes itself.
"""
from __future__ import annotations

import asyncio
import tracemalloc
from types import SimpleNamespace

import pytest

from skyrt.runtime.server import memtrace

TOKEN = "t0ken"


@pytest.fixture
def debugging(monkeypatch):
    """memtrace switched on as $SKYRT_TRACEMALLOC=4 would at start-up; tracing stopped afterwards."""
    was_tracing = tracemalloc.is_tracing()
    monkeypatch.setattr(memtrace, "_enabled", False)
    assert memtrace.start_from_env({memtrace.TRACEMALLOC_ENV: "4"}) == 4
    yield
    if not was_tracing:
        tracemalloc.stop()


def _app(token):
    from aiohttp import web

    from skyrt.runtime.server.guard import token_matches

    app = web.Application()
    server = SimpleNamespace(config=SimpleNamespace(token=token))
    memtrace.add_debug_routes(app, server, lambda r: token is None or token_matches(r.raw_headers, token),
                              lambda status, message: web.json_response({"error": message}, status=status))
    return app


def _get(app, path: str, headers=None):
    """(status, JSON body or None) of one GET on a fresh server of `app`."""
    import json

    from aiohttp.test_utils import TestClient, TestServer

    async def run():
        async with TestClient(TestServer(app)) as client:
            reply = await client.get(path, headers=headers or {})
            text = await reply.text()
            return reply.status, json.loads(text) if reply.content_type == "application/json" else None

    return asyncio.run(run())


def test_off_unless_the_environment_asks(monkeypatch):
    monkeypatch.setattr(memtrace, "_enabled", False)
    assert memtrace.start_from_env({}) is None
    assert memtrace.start_from_env({memtrace.TRACEMALLOC_ENV: "  "}) is None
    status, _ = _get(_app(TOKEN), "/debug/memory", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 404  # no route at all, even with the token


def test_a_bad_value_names_the_variable_and_the_fix(monkeypatch):
    monkeypatch.setattr(memtrace, "_enabled", False)
    with pytest.raises(ValueError, match=r"SKYRT_TRACEMALLOC='eight'.*e\.g\. 8"):
        memtrace.start_from_env({memtrace.TRACEMALLOC_ENV: "eight"})
    with pytest.raises(ValueError, match="0..100"):
        memtrace.start_from_env({memtrace.TRACEMALLOC_ENV: "1000"})
    assert not memtrace._enabled


def test_zero_means_heap_figures_without_tracing(monkeypatch):
    if tracemalloc.is_tracing():
        pytest.skip("this interpreter traces already (python -X tracemalloc)")
    monkeypatch.setattr(memtrace, "_enabled", False)
    assert memtrace.start_from_env({memtrace.TRACEMALLOC_ENV: "0"}) == 0
    assert not tracemalloc.is_tracing()
    status, body = _get(_app(TOKEN), "/debug/memory", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["tracing"] is False and "sites" not in body
    assert body["object_types"]  # counted by the garbage collector, no tracing needed


def test_the_token_guards_it(debugging):
    assert _get(_app(TOKEN), "/debug/memory")[0] == 401
    assert _get(_app(TOKEN), "/debug/memory", {"Authorization": "Bearer wrong"})[0] == 401
    status, body = _get(_app(None), "/debug/memory")
    assert status == 403 and "--no-token" in body["error"]  # open control is no reason to open this


def test_a_snapshot_lists_what_was_allocated_and_where(debugging):
    held = [bytearray(1000) for _ in range(300)]  # ~300 kB from this line, alive during the request
    status, body = _get(_app(TOKEN), "/debug/memory?limit=50", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["tracing"] is True
    assert len(body["sites"]) <= 50 and body["sites_total"] >= len(body["sites"])
    mine = [s for s in body["sites"] if s["where"][0].endswith(f"test_memtrace.py:{_line_of('held = [')}")]
    assert mine, "the 300 bytearrays of this test are not among the largest sites"
    assert mine[0]["count"] >= 300 and mine[0]["size"] >= 300 * 1000
    assert body["traced_bytes"] >= mine[0]["size"]
    if body["heap"] is not None:  # glibc
        assert body["heap"]["in_use_bytes"] > 0
    del held


def test_limit_zero_answers_totals_without_a_snapshot(debugging):
    status, body = _get(_app(TOKEN), "/debug/memory?limit=0&types=0", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["traced_bytes"] > 0
    assert "sites" not in body and "object_types" not in body
    assert _get(_app(TOKEN), "/debug/memory?limit=x", {"Authorization": f"Bearer {TOKEN}"})[0] == 400


def _line_of(text: str) -> int:
    """The line number in this file of the first line containing `text` (not the search itself)."""
    from pathlib import Path

    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line and "_line_of" not in line)
