"""`skyrt serve`: an endless generated stream over HTTP (first cut: MJPEG + control API).

One generator thread owns the pipeline and publishes frames at a steady pace; HTTP handlers only
read the latest published JPEG, so a slow client never slows the generator or other clients.
Binds 127.0.0.1 unless told otherwise; `--token` guards control endpoints; bodies are bounded.

    GET  /             page that shows the stream
    GET  /stream.mjpg  multipart/x-mixed-replace JPEG stream
    GET  /status       JSON figures;  GET /healthz  liveness
    POST /prompt       {"prompt": "..."} switches the prompt at the next window
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("skyrt.server")

MAX_BODY_BYTES = 16 * 1024
MAX_PROMPT_CHARS = 2000
BOUNDARY = "skyrtframe"

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>skyrt</title>
<style>body{background:#111;color:#ddd;font-family:sans-serif;text-align:center}
img{image-rendering:pixelated;width:min(90vw,90vh);border:1px solid #333}</style></head>
<body><h3>skyrt endless stream</h3><img id="v" src="/stream.mjpg" alt="stream">
<p id="s"></p><script>
async function tick(){try{const r=await fetch('/status');const j=await r.json();
document.getElementById('s').textContent=`${j.frames_published} frames, ${j.generated_fps.toFixed(1)} generated fps, prompt: ${j.prompt}`;}catch(e){}}
setInterval(tick,1000);tick();</script></body></html>"""


@dataclass
class StreamState:
    """What the generator thread publishes; guarded by `lock`."""

    prompt: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    jpeg: bytes | None = None
    frame_index: int = 0
    frames_generated: int = 0
    started: float = field(default_factory=time.monotonic)
    first_frame_s: float | None = None
    errors: int = 0
    pending_prompt: str | None = None
    new_frame: threading.Condition = field(init=False)

    def __post_init__(self):
        self.new_frame = threading.Condition(self.lock)


def encode_jpeg(frame: np.ndarray, quality: int = 85) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Generator(threading.Thread):
    """Owns the pipeline: streams windows, paces frames at `fps`, restarts cleanly after errors."""

    def __init__(self, pipe, state: StreamState, fps: int, sampling: dict):
        super().__init__(name="skyrt-generator", daemon=True)
        self.pipe, self.state, self.fps, self.sampling = pipe, state, fps, sampling
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._run_stream()
            except Exception:  # keep the last good frame on screen and start over
                log.exception("generator failed; restarting from a clean state")
                with self.state.lock:
                    self.state.errors += 1
                self.stop_event.wait(1.0)

    def _run_stream(self) -> None:
        with self.state.lock:
            prompt = self.state.pending_prompt or self.state.prompt
            self.state.prompt, self.state.pending_prompt = prompt, None
        period = 1.0 / self.fps
        next_due = time.monotonic()
        for chunk in self.pipe.stream(prompt, **self.sampling):
            for frame in chunk:
                if self.stop_event.is_set():
                    return
                self._publish(encode_jpeg(frame))
                next_due = max(next_due + period, time.monotonic() - period)
                self.stop_event.wait(max(0.0, next_due - time.monotonic()))
            if self.state.pending_prompt is not None:
                return  # restart the stream with the new prompt

    def _publish(self, jpeg: bytes) -> None:
        with self.state.lock:
            self.state.jpeg = jpeg
            self.state.frame_index += 1
            self.state.frames_generated += 1
            if self.state.first_frame_s is None:
                self.state.first_frame_s = time.monotonic() - self.state.started
            self.state.new_frame.notify_all()


def create_app(state: StreamState, token: str | None = None):
    """The aiohttp application; handlers only read `state` (and queue a prompt switch)."""
    from aiohttp import web

    def authorized(request) -> bool:
        return token is None or request.headers.get("Authorization") == f"Bearer {token}"

    async def index(_request):
        return web.Response(text=PAGE, content_type="text/html")

    async def healthz(_request):
        return web.json_response({"ok": True})

    async def status(_request):
        with state.lock:
            elapsed = max(1e-9, time.monotonic() - state.started)
            return web.json_response({
                "prompt": state.prompt,
                "frames_published": state.frame_index,
                "generated_fps": state.frames_generated / elapsed,
                "time_to_first_frame_s": state.first_frame_s,
                "generator_errors": state.errors,
            })

    async def prompt(request):
        if not authorized(request):
            return web.json_response({"error": "unauthorized: send 'Authorization: Bearer <token>'"}, status=401)
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return web.json_response({"error": f"body larger than {MAX_BODY_BYTES} bytes"}, status=413)
        try:
            body = json.loads(await request.content.read(MAX_BODY_BYTES + 1))
        except (ValueError, UnicodeDecodeError):
            return web.json_response({"error": 'body must be JSON like {"prompt": "..."}'}, status=400)
        if not isinstance(body, dict) or set(body) != {"prompt"} or not isinstance(body["prompt"], str):
            return web.json_response({"error": 'body must be exactly {"prompt": "<text>"}'}, status=400)
        if not 0 < len(body["prompt"]) <= MAX_PROMPT_CHARS:
            return web.json_response({"error": f"prompt must be 1..{MAX_PROMPT_CHARS} characters"}, status=400)
        with state.lock:
            state.pending_prompt = body["prompt"]
        return web.json_response({"ok": True, "prompt": body["prompt"]})

    async def mjpeg(request):
        response = web.StreamResponse(headers={"Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        last = -1
        try:
            while True:
                jpeg, last = await asyncio.to_thread(_wait_for_frame, state, last)
                if jpeg is None:
                    continue
                head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                await response.write(head + jpeg + b"\r\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client went away; nothing to clean up
        return response

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    app.router.add_post("/prompt", prompt)
    app.router.add_get("/stream.mjpg", mjpeg)
    return app


def _wait_for_frame(state: StreamState, last: int, timeout: float = 1.0) -> tuple[bytes | None, int]:
    with state.lock:
        state.new_frame.wait_for(lambda: state.frame_index != last, timeout=timeout)
        return (state.jpeg if state.frame_index != last else None), state.frame_index


def serve(pipe, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, prompt: str = "", fps: int = 24,
          **sampling) -> None:
    """Run the generator thread and the HTTP server until interrupted (SIGINT/SIGTERM)."""
    from aiohttp import web

    state = StreamState(prompt=prompt)
    generator = Generator(pipe, state, fps, dict(sampling, fps=fps))
    generator.start()
    log.info("serving on http://%s:%d/ (MJPEG at /stream.mjpg)", host, port)
    try:
        web.run_app(create_app(state, token), host=host, port=port, print=None)
    finally:
        generator.stop_event.set()
        generator.join(timeout=5)
