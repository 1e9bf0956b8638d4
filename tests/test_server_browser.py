"""The page in a real browser: headless Chromium opens `/`, plays the HLS stream through the
vendored hls.js and shows the MJPEG stream in an <img>; the page's own playback counters
(requestVideoFrameCallback for the video, pixel changes for the <img>) are read back through the
DevTools protocol and must keep rising."""
from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest
from serving import free_port, require_tool, running_server


async def _devtools_page(port: int, timeout: float = 30.0) -> str:
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
                raise AssertionError("Chromium's DevTools endpoint never came up")
            await asyncio.sleep(0.2)


async def _watch_page(devtools_port: int, url: str, seconds: float) -> list[dict]:
    """Open `url`, then sample window.skyrt every second for `seconds`."""
    import aiohttp

    ws_url = await _devtools_page(devtools_port)
    samples, ids = [], iter(range(1, 10_000))
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        async def call(method: str, **params):
            msg_id = next(ids)
            await ws.send_json({"id": msg_id, "method": method, "params": params})
            while True:
                reply = await ws.receive_json(timeout=30)
                if reply.get("id") == msg_id:
                    return reply.get("result", {})

        await call("Page.navigate", url=url)
        for _ in range(int(seconds)):
            await asyncio.sleep(1.0)
            result = await call("Runtime.evaluate", expression="JSON.stringify(window.skyrt || null)",
                                returnByValue=True)
            samples.append(json.loads(result.get("result", {}).get("value") or "null") or {})
    return samples


def test_chromium_plays_hls_and_mjpeg_from_the_page(official_dir, tmp_path):
    chromium = require_tool("chromium")
    with running_server(official_dir) as (base, _):
        port = free_port()
        browser = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--mute-audio", "--no-first-run",
             "--autoplay-policy=no-user-gesture-required", f"--remote-debugging-port={port}",
             f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            samples = asyncio.run(_watch_page(port, base + "/?view=both", seconds=20))
        finally:
            browser.terminate()
            browser.wait(timeout=20)
    last = samples[-1]
    print(f"after {len(samples)} s: {last.get('videoFrames')} video frames presented, {last.get('mjpegChanges')} MJPEG "
          f"changes, {last.get('hlsErrors')} hls.js errors")
    assert last.get("view") == "both", samples
    # Playback progresses: frames keep being presented over the last seconds, not just once.
    assert last["videoFrames"] >= 24, samples
    assert last["videoFrames"] > samples[-6]["videoFrames"], samples
    assert last["mjpegLoads"] >= 1 and last["mjpegChanges"] >= 10, samples
    assert last["mjpegChanges"] > samples[-6]["mjpegChanges"], samples
    assert last["lastStatus"]["frames_output"] > 0
