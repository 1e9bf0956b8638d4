"""The page in a real browser: headless Chromium opens `/`, plays the HLS stream through the
vendored hls.js and shows the MJPEG stream in an <img>; the page's own playback counters
(requestVideoFrameCallback for the video, pixel changes for the <img>) are read back through the
DevTools protocol and must keep rising. Then the control endpoints against a real browser: a page
on another local origin cannot change the prompt (no-cors fetch, a plain form, a CORS fetch), the
server's own page can, with the token it was opened with."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request

import pytest
from contextlib import contextmanager

from benchmark_scripts import load_benchmark
from serving import TOKEN, free_port, get_json, require_tool, running_server, wait_until


async def _in_page(devtools_port: int, url: str, steps):
    """Open `url` in the browser's page, then `await steps(evaluate)`, where `evaluate(js)` returns
    the value of a JavaScript expression (promises awaited)."""
    async with load_benchmark("devtools").devtools_page(devtools_port) as page:
        await page.call("Page.navigate", url=url)
        return await steps(page.evaluate)


def _watch_page(devtools_port: int, url: str, seconds: float) -> list[dict]:
    """Open `url`, then sample window.skyrt every second for `seconds`."""
    async def sample(evaluate):
        samples = []
        for _ in range(int(seconds)):
            await asyncio.sleep(1.0)
            samples.append(json.loads(await evaluate("JSON.stringify(window.skyrt || null)") or "null") or {})
        return samples

    return asyncio.run(_in_page(devtools_port, url, sample))


@contextmanager
def _chromium(tmp_path):
    """Headless Chromium with an empty profile; yields its DevTools port."""
    chromium = require_tool("chromium")
    port = free_port()
    browser = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--mute-audio", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", f"--remote-debugging-port={port}",
         f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        browser.terminate()
        browser.wait(timeout=20)


def test_chromium_plays_hls_and_mjpeg_from_the_page(official_dir, tmp_path):
    with running_server(official_dir) as (base, _), _chromium(tmp_path) as devtools:
        samples = _watch_page(devtools, base + "/?view=both", seconds=20)
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


# A page on another local origin that tries every way a browser lets a page send a POST without
# the target's consent: a no-cors fetch with a text/plain body, a plain form (text/plain encoding,
# so the body is JSON-looking), and a CORS fetch with a JSON body (which needs a preflight).
ATTACK_PAGE = """<!doctype html><html><body>
<form id="form" method="POST" action="{target}/prompt" enctype="text/plain" target="sink">
  <input name='{{"prompt": "pwned by a form", "x": "' value='"}}'>
</form>
<iframe name="sink"></iframe>
<script>
window.attempts = 0;
const body = JSON.stringify({{prompt: "pwned by fetch"}});
fetch("{target}/prompt", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}})
  .catch(() => {{}}).finally(() => window.attempts++);
fetch("{target}/prompt", {{method: "POST", headers: {{"Content-Type": "application/json"}}, body}})
  .catch(() => {{}}).finally(() => window.attempts++);
document.getElementById("form").submit();
</script></body></html>"""


def test_a_page_on_another_origin_cannot_change_the_prompt_of_an_open_server(official_dir, tmp_path):
    """The worst case, --no-token: only the Origin, Host and content-type checks stand guard."""
    site = tmp_path / "site"
    site.mkdir()
    with running_server(official_dir, token=None) as (base, _), _chromium(tmp_path) as devtools:
        (site / "attack.html").write_text(ATTACK_PAGE.format(target=base))
        attacker_port = free_port()
        attacker = subprocess.Popen([sys.executable, "-m", "http.server", str(attacker_port), "--bind", "127.0.0.1",
                                     "--directory", str(site)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{attacker_port}/attack.html", timeout=2), 10)
            before = get_json(base + "/status")

            async def attack(evaluate):
                for _ in range(100):
                    if await evaluate("window.attempts") == 2:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # the form's navigation lands in the iframe
                return await evaluate("window.attempts")

            # localhost:<other port> is another origin of the same machine, as a local web app would be
            attempts = asyncio.run(_in_page(devtools, f"http://localhost:{attacker_port}/attack.html", attack))
        finally:
            attacker.terminate()
            attacker.wait(timeout=20)
        after = get_json(base + "/status")
    assert attempts == 2
    assert after["prompt"] == before["prompt"] and after["prompt_switches"] == before["prompt_switches"], after
    # The no-cors fetch and the form did reach the server and were refused there (the CORS fetch
    # stops at its preflight, which the server does not grant).
    assert after["control_refused"] - before["control_refused"] >= 2, (before, after)


def test_the_servers_own_page_switches_the_prompt_with_the_token_from_its_url(official_dir, tmp_path):
    prompt = "a yellow star on a gray background"
    with running_server(official_dir) as (base, _), _chromium(tmp_path) as devtools:
        async def switch(evaluate):
            for _ in range(100):  # the page script has run once the token field is filled
                if await evaluate("document.getElementById('token').value"):
                    break
                await asyncio.sleep(0.1)
            kept_out_of_url = await evaluate("location.hash === ''")
            await evaluate(f"document.getElementById('prompt').value = {json.dumps(prompt)}; "
                           "document.querySelector('#prompt-form button, #prompt-form [type=submit]').click(); true")
            for _ in range(100):
                message = await evaluate("document.getElementById('msg').textContent")
                if message:
                    return kept_out_of_url, message
                await asyncio.sleep(0.1)
            return kept_out_of_url, None

        kept_out_of_url, message = asyncio.run(_in_page(devtools, f"{base}/#token={TOKEN}", switch))
        status = get_json(base + "/status")
    assert kept_out_of_url  # the token left the address bar (history, screenshots, shoulder surfing)
    assert message == "switching to: " + prompt, message
    assert status["prompt"] == prompt
