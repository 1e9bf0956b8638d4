"""Egress: latency behind live per output in Chromium, WebRTC viewer load, serving CPU per frame delivered.

One run, one `skyrt serve` (built-in default model, 64x64, 12 fps, --formats mjpeg,hls,webrtc, so
LL-HLS too) whose pacer stamps every frame it hands to the encoders with the wall clock (24 bits of
milliseconds as 8x8 black/white blocks, top left): the moment a frame goes live on every output.

1. Latency behind live, per output (MJPEG, HLS, LL-HLS, WebRTC), in headless Chromium over loopback:
   the server's own page with ?view=..., and a sampler injected through the DevTools protocol that
   reads the stamp back from the frame the browser presents (requestVideoFrameCallback for <video>,
   every animation frame for the MJPEG <img>) and records Date.now() - stamp (one machine, one clock).
   p50 / p99 over every new frame presented in `--seconds` after a warm-up.
2. Viewer load: no viewers, then 20 MJPEG (benchmarks/viewers.py), 20 HLS (viewers.py) and 20 WebRTC
   (benchmarks/whep_viewers.py, aiortc clients) viewers, each for `--seconds`, viewers in a second
   process at lower priority. Per phase: the generator's fps and its busy-time rate (frames per second
   spent generating: what the model achieves under the load, whatever the pacer's fps) as ratios to
   no viewers, and the server process's own CPU (the generator child excluded): CPU per viewer and
   CPU µs per frame delivered (extra CPU over no viewers / frames the viewers received; HLS: viewers x
   fps x seconds, each viewer fetching every segment once).

    flock LOCK python benchmarks/egress.py --seconds 15 --out benchmarks/results/egress.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from devtools import devtools_page  # noqa: E402

HERE = Path(__file__).resolve().parent
STAMP_BITS, BLOCK, COLUMNS = 24, 8, 6
WRAP = 1 << STAMP_BITS  # the stamp is wall-clock ms modulo 2^24 (4.6 hours)
OUTPUT_PAGES = {"mjpeg": ("?view=mjpeg", "mjpeg"), "hls": ("?view=hls", "video"),
                "llhls": ("?view=hls&ll=1", "video"), "webrtc": ("?view=webrtc", "webrtc")}


# ------------------------------------------------------------------ the stamped server (a child process)
def draw_stamp(frame, ms: int):
    """A copy of `frame` (H, W, 3 uint8, H >= 32, W >= 48) with `ms` in its top-left blocks."""
    frame = frame.copy()
    for bit in range(STAMP_BITS):
        y, x = bit // COLUMNS * BLOCK, bit % COLUMNS * BLOCK
        frame[y:y + BLOCK, x:x + BLOCK] = 255 if (ms >> bit) & 1 else 0
    return frame


def read_stamp(frame) -> int:
    """The stamp in a decoded frame, read as the page's sampler reads it (block centres, mean > 128)."""
    value = 0
    for bit in range(STAMP_BITS):
        y, x = bit // COLUMNS * BLOCK + BLOCK // 2, bit % COLUMNS * BLOCK + BLOCK // 2
        value += int(frame[y, x].astype(int).mean() > 128) << bit
    return value


def serve_stamped(argv: list[str]) -> int:
    """`skyrt serve argv` with the pacer stamping each frame as it hands it to the encoders."""
    from skyrt.runtime import cli
    from skyrt.runtime.server.generator import PacerThread

    emit = PacerThread._emit

    def stamped_emit(self, frame, repeated):
        emit(self, draw_stamp(frame, int(time.time() * 1000) % WRAP), repeated)

    PacerThread._emit = stamped_emit
    return cli.main(["serve", *argv])


# ------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_seconds(base: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return float(re.search(r"^skyrt_chunk_latency_seconds_sum (\S+)$", text, re.M).group(1))


def snapshot(base: str, pid: int) -> dict:
    status = get_json(base + "/status")
    return {"generated": status["frames_generated"], "busy_s": busy_seconds(base), "cpu_s": cpu_seconds(pid),
            "t": time.monotonic()}


def between(before: dict, after: dict) -> dict:
    seconds = after["t"] - before["t"]
    frames = after["generated"] - before["generated"]
    busy = after["busy_s"] - before["busy_s"]
    return {"seconds": round(seconds, 2), "generated_fps": frames / seconds,
            "busy_rate_fps": frames / busy if busy > 0 else None, "serving_cpu_cores": (after["cpu_s"] - before["cpu_s"]) / seconds}


def nearest_rank(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


# ------------------------------------------------------------------------------ Chromium
SAMPLER = """(() => {
  const el = document.getElementById(%(element)r);
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 64;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  window.latencies = []; window.unreadable = 0;
  let last = -1;
  const record = () => {
    if (!(el.videoWidth || el.naturalWidth)) return;
    ctx.drawImage(el, 0, 0, 64, 64);
    const d = ctx.getImageData(0, 0, 64, 64).data;
    let stamp = 0;
    for (let bit = 0; bit < %(bits)d; bit++) {
      const x = (bit %% %(cols)d) * %(block)d + %(block)d / 2, y = Math.floor(bit / %(cols)d) * %(block)d + %(block)d / 2;
      const p = (y * 64 + x) * 4;
      if ((d[p] + d[p + 1] + d[p + 2]) / 3 > 128) stamp += 2 ** bit;
    }
    if (stamp === last) return;  // the same frame again (an <img> between parts)
    last = stamp;
    const behind = ((Date.now() %% %(wrap)d) - stamp + %(wrap)d) %% %(wrap)d;
    if (behind > 60000) { window.unreadable++; return; }
    window.latencies.push(behind);
  };
  if (el.tagName === "VIDEO") {
    const each = () => { record(); el.requestVideoFrameCallback(each); };
    el.requestVideoFrameCallback(each);
  } else {
    const each = () => { record(); requestAnimationFrame(each); };
    requestAnimationFrame(each);
  }
  return true;
})()"""


class Chromium:
    def __init__(self, profile: Path):
        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        self.port = free_port()
        self.proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--mute-audio", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--autoplay-policy=no-user-gesture-required", f"--remote-debugging-port={self.port}",
             f"--user-data-dir={profile}", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)

    async def measure(self, url: str, element: str, warmup_s: float, seconds: float) -> dict:
        async with devtools_page(self.port) as page:
            await page.call("Page.navigate", url=url)
            await asyncio.sleep(warmup_s)
            await page.evaluate(SAMPLER % {"element": element, "bits": STAMP_BITS, "cols": COLUMNS, "block": BLOCK,
                                           "wrap": WRAP})
            await asyncio.sleep(seconds)
            values = await page.evaluate("JSON.stringify([window.latencies, window.unreadable])")
            await page.call("Page.navigate", url="about:blank")  # ends the player (WHEP: pagehide DELETE)
        latencies, unreadable = json.loads(values)
        return {"frames": len(latencies), "unreadable": unreadable,
                "p50_s": _s(nearest_rank(latencies, 0.5)), "p99_s": _s(nearest_rank(latencies, 0.99)),
                "min_s": _s(min(latencies) if latencies else None)}


def _s(ms):
    return None if ms is None else round(ms / 1000, 3)


# ------------------------------------------------------------------------------ viewer phases
def viewer_phase(base: str, pid: int, kind: str, count: int, seconds: float, fps: int) -> dict:
    port = base.rsplit(":", 1)[1]
    if kind == "webrtc":
        cmd = [sys.executable, str(HERE / "whep_viewers.py"), "--base", base, "--count", str(count),
               "--seconds", str(seconds)]
    else:
        cmd = [sys.executable, str(HERE / "viewers.py"), "--port", port, "--format", kind, "--count", str(count),
               "--seconds", str(seconds), "--nice", "10"]
    viewers = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    time.sleep(min(5.0, seconds / 3))  # connected and steady (WebRTC: ICE + DTLS) before the window opens
    before = snapshot(base, pid)
    window = seconds - min(5.0, seconds / 3) - 1.0
    time.sleep(window)
    after = snapshot(base, pid)
    report = json.loads(viewers.communicate(timeout=seconds + 60)[0].strip().splitlines()[-1])
    phase = between(before, after)
    # Frames the viewers received during the window, estimated from their whole-run rate.
    if kind == "webrtc":
        frames = report["frames"] * window / seconds
    elif kind == "mjpeg":
        frames = report["mjpeg_parts"] * window / seconds
    elif kind == "mp4":
        frames = report["mp4_fragments"] * window / seconds
    else:
        frames = count * fps * window
    phase.update(viewers=count, viewer_report=report, frames_delivered_in_window=round(frames))
    return phase


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0, help="per measured phase")
    p.add_argument("--viewers", type=int, default=20)
    p.add_argument("--fps", type=int, default=12)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", type=Path, default=HERE / "results" / "egress.json")
    p.add_argument("--skip-latency", action="store_true", help="viewer phases only (e.g. with --fps above the "
                   "model's rate, so the generator runs flat out and its fps ratio is the model's under load)")
    p.add_argument("--serve-stamped", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_stamped is not None:
        sys.exit(serve_stamped(args.serve_stamped))

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="egress-serve-", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, __file__, "--serve-stamped", "--port", str(port), "--no-token",
                               "--fps", str(args.fps), "--height", str(args.size), "--width", str(args.size),
                               "--formats", "mjpeg,hls,webrtc", "--max-connections-per-address", "1000"],
                              stdout=log, stderr=subprocess.STDOUT)
    profile = Path(tempfile.mkdtemp(prefix="egress-chromium-"))
    browser = None
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if get_json(base + "/status")["frames_output"] > 0:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server never produced a frame:\n" + Path(log.name).read_text()[-3000:])
            time.sleep(0.5)
        latency = {}
        browser = None if args.skip_latency else Chromium(profile)
        for name, (query, element) in ([] if args.skip_latency else OUTPUT_PAGES.items()):
            latency[name] = asyncio.run(browser.measure(base + "/" + query, element, warmup_s=6.0, seconds=args.seconds))
            print(name, latency[name], flush=True)
        if browser is not None:
            browser.close()
            browser = None
        time.sleep(2.0)

        alone_before = snapshot(base, server.pid)
        time.sleep(args.seconds)
        alone = between(alone_before, snapshot(base, server.pid))
        print("alone", alone, flush=True)
        phases = {}
        for kind in ("mjpeg", "hls", "webrtc"):
            phases[kind] = phase = viewer_phase(base, server.pid, kind, args.viewers, args.seconds, args.fps)
            extra = phase["serving_cpu_cores"] - alone["serving_cpu_cores"]
            phase["generated_fps_ratio"] = round(phase["generated_fps"] / alone["generated_fps"], 3)
            if phase["busy_rate_fps"] and alone["busy_rate_fps"]:
                phase["busy_rate_ratio"] = round(phase["busy_rate_fps"] / alone["busy_rate_fps"], 3)
            phase["serving_cpu_per_viewer_cores"] = round(extra / args.viewers, 5)
            delivered_per_s = phase["frames_delivered_in_window"] / phase["seconds"]
            phase["serving_cpu_us_per_frame_delivered"] = round(extra / delivered_per_s * 1e6, 1) if delivered_per_s else None
            print(kind, {k: v for k, v in phase.items() if k != "viewer_report"}, flush=True)
            time.sleep(2.0)
        status = get_json(base + "/status")
    finally:
        if browser is not None:
            browser.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(profile, ignore_errors=True)
        log.close()
        Path(log.name).unlink(missing_ok=True)
    result = {
        "benchmark": "egress", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "python": platform.python_version(),
                                           "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "settings": {"size": args.size, "fps": args.fps, "seconds_per_phase": args.seconds, "viewers": args.viewers,
                     "model": "built-in default", "formats": "mjpeg,hls,webrtc (+llhls)"},
        "latency_behind_live": latency, "no_viewers": alone, "viewer_phases": phases,
        "server_frames_repeated": status["frames_repeated"], "server_frames_output": status["frames_output"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
