"""A minimal Chrome DevTools protocol client: open the page of a headless Chromium and evaluate
JavaScript in it. Used by benchmarks/egress.py (latency behind live) and the browser tests."""
from __future__ import annotations

import asyncio
import itertools
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator


async def page_websocket_url(port: int, timeout: float = 30.0) -> str:
    """The DevTools websocket of the browser's first page, once its endpoint on `port` answers."""
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                    pages = [t for t in await r.json() if t["type"] == "page"]
                    if pages:
                        return pages[0]["webSocketDebuggerUrl"]
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"Chromium's DevTools endpoint on port {port} never came up")
            await asyncio.sleep(0.2)


class DevToolsPage:
    """One page's protocol session: `call` sends a command and waits for its own reply."""

    def __init__(self, ws):
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params) -> dict:
        msg_id = next(self._ids)
        await self._ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:  # events and other replies arrive on the same socket; skip them
            reply = await self._ws.receive_json(timeout=30)
            if reply.get("id") == msg_id:
                return reply.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited)."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")


@asynccontextmanager
async def devtools_page(port: int) -> AsyncIterator[DevToolsPage]:
    """A protocol session on the first page of the Chromium whose DevTools listen on `port`."""
    import aiohttp

    ws_url = await page_websocket_url(port)
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        yield DevToolsPage(ws)
