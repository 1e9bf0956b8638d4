"""`skyrt serve` under load: generation rate alone vs with many clients, in one run.

Starts a real server process on loopback, lets the generator run flat out (the pacer fps is set
above what the model can generate, so the generated rate is the model's rate), measures the
generated frames/s with no clients, then again while N clients read across MJPEG, fMP4 and HLS
(one of them never reads), then runs connect/disconnect cycles and checks open files and memory
return to their baseline. Writes JSON; the ratio (load / alone) is the figure to quote.

    python benchmarks/serve.py                          # default model and serve settings, 128x128
    python benchmarks/serve.py --model DIR --height 32 --width 32 --steps 2 --seconds 10
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the built-in default model)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: serve's default)")
    p.add_argument("--extra", default="", help="more `skyrt serve` flags, e.g. '--mode window'")
    p.add_argument("--pacer-fps", type=int, default=120, help="output fps; above the generated rate on purpose")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=20.0, help="length of each measured phase")
    p.add_argument("--cycles", type=int, default=200, help="connect/disconnect cycles")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    return p.parse_args()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "skyrt.runtime.cli", "serve", "--port", str(port), "--fps", str(args.pacer_fps),
           "--height", str(args.height), "--width", str(args.width), *args.extra.split()]
    if args.model:
        cmd += ["--model", args.model]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if get_json(base + "/status")["frames_generated"] > 0:
                return proc, base
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server never produced a frame")


def generated_rate(base: str, seconds: float) -> dict:
    """Generated frames/s over `seconds`, from the server's own counters."""
    a = get_json(base + "/status")
    time.sleep(seconds)
    b = get_json(base + "/status")
    return {"generated_fps": (b["frames_generated"] - a["frames_generated"]) / (b["uptime_s"] - a["uptime_s"]),
            "chunk_latency_p50_s": b["chunk_latency_p50_s"], "chunk_latency_p99_s": b["chunk_latency_p99_s"],
            "open_fds": b["open_fds"], "resident_memory_mb": b["resident_memory_bytes"] / 1e6,
            "clients": b["clients"], "client_drops": b["client_drops"]}


def reader(url: str, stop: threading.Event, got: list) -> None:
    with urllib.request.urlopen(url, timeout=60) as r:
        while not stop.is_set():
            got[0] += len(r.read1(65536))


def hls_poller(url: str, stop: threading.Event, got: list) -> None:
    while not stop.is_set():
        with urllib.request.urlopen(url, timeout=60) as r:
            got[0] += len(r.read())
        time.sleep(0.5)


def main() -> None:
    args = parse_args()
    proc, base = start_server(args)
    try:
        time.sleep(3.0)  # past the first-chunk warm-up
        alone = generated_rate(base, args.seconds)
        stop = threading.Event()
        paths = ["/stream.mjpg", "/stream.mp4", "/hls/live.m3u8"]
        got = [[0] for _ in range(args.clients - 1)]
        workers = [threading.Thread(target=hls_poller if i % 3 == 2 else reader,
                                    args=(base + paths[i % 3], stop, got[i]), daemon=True)
                   for i in range(args.clients - 1)]
        stalled = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        stalled.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: bench\r\n\r\n")  # never reads
        for w in workers:
            w.start()
        time.sleep(1.0)
        loaded = generated_rate(base, args.seconds)
        stop.set()
        for w in workers:
            w.join(timeout=60)
        stalled.close()
        started = time.perf_counter()
        for i in range(args.cycles):
            with urllib.request.urlopen(base + paths[i % 2], timeout=30) as r:
                r.read1(100)
        cycles_s = time.perf_counter() - started
        time.sleep(2.0)
        after = generated_rate(base, 2.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)
    report = {
        "benchmark": "serve",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu",
                    "load_average_at_end": os.getloadavg()[0]},
        "config": vars(args) | {"out": args.out.name},  # as the other benchmarks: no machine folders
        "alone": alone,
        "with_clients": dict(loaded, bytes_per_client=[g[0] for g in got]),
        "ratio_generated_fps_with_clients_vs_alone": loaded["generated_fps"] / alone["generated_fps"],
        "connect_disconnect": {"cycles": args.cycles, "seconds": cycles_s},
        "after": {"open_fds": after["open_fds"], "resident_memory_mb": after["resident_memory_mb"],
                  "clients": after["clients"]},
        "exit_code_after_sigterm": exit_code,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("alone", "ratio_generated_fps_with_clients_vs_alone", "after")},
                     indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
