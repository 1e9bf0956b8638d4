"""A crowd of HLS viewers through real nginx (deploy/nginx/skyrt.conf) in front of `skyrt serve`: how
many requests per file reach the origin, and what the crowd costs the generator.

nginx runs unprivileged from a temporary prefix, with the shipped config's origin address, listen
port and cache folder substituted (`nginx_config`). The viewers are benchmarks/viewers.py's HLS
players. The origin counts what it answers per kind of HLS file and how many distinct file versions
that was (/status hls_requests); requests / files is the figure (1: the proxy asked once per file).
The generator's rate is measured interleaved: the viewers are paused and resumed every few seconds
(on-off-off-on), so this machine's drift hits both alike (see serve.py's measure_interleaved).

    python benchmarks/nginx_crowd.py --viewers 200 --cycles 3    # writes benchmarks/results/nginx_crowd.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = ROOT / "deploy" / "nginx" / "skyrt.conf"
VIEWERS_SCRIPT = Path(__file__).with_name("viewers.py")
# The shipped config's values an operator sets, as they appear there, and what they become here.
ORIGIN_LINE, LISTEN_LINE, CACHE_FOLDER = "server 127.0.0.1:8000;", "listen 8080;", "/var/cache/nginx/skyrt"


def nginx_config(prefix: Path, origin_port: int, listen_port: int, shipped: Path = SHIPPED_CONFIG) -> Path:
    """A main nginx.conf under `prefix` that includes the shipped skyrt.conf with its marked values
    substituted (each must appear exactly once: a drifted shipped file fails here, not silently), plus
    what an unprivileged nginx needs: pid, logs and temp folders inside the prefix. Returns its path."""
    text = shipped.read_text()
    for old, new in ((ORIGIN_LINE, f"server 127.0.0.1:{origin_port};"),
                     (LISTEN_LINE, f"listen 127.0.0.1:{listen_port};"), (CACHE_FOLDER, str(prefix / "cache"))):
        if text.count(old) != 1:
            raise ValueError(f"{shipped} should contain {old!r} exactly once (found {text.count(old)})")
        text = text.replace(old, new)
    (prefix / "skyrt.conf").write_text(text)
    temp = "\n".join(f"    {kind}_temp_path {prefix / 'temp' / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # Run by root, nginx's workers would switch to an unprivileged user who cannot write the prefix's
    # cache folder (made by the master): keep them as whoever runs this.
    import getpass

    user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
    main = prefix / "nginx.conf"
    main.write_text(f"""{user}worker_processes 1;
pid {prefix / 'nginx.pid'};
error_log {prefix / 'error.log'} warn;
events {{ worker_connections 4096; }}
http {{
    log_format cache '$request_uri $status $upstream_cache_status $upstream_addr';
    access_log {prefix / 'access.log'} cache;
{temp}
    include {prefix / 'skyrt.conf'};
}}
""")
    return main


@contextmanager
def running_nginx(origin_port: int, listen_port: int, nginx: str = "nginx"):
    """nginx in front of the origin on 127.0.0.1:`listen_port`, in the foreground of a temp prefix;
    yields the prefix folder (access.log there). Stopped (SIGQUIT, then SIGKILL) and removed after."""
    prefix = Path(tempfile.mkdtemp(prefix="skyrt-nginx-"))
    (prefix / "temp").mkdir()
    config = nginx_config(prefix, origin_port, listen_port)
    check = subprocess.run([nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(config), "-t"],
                           capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise RuntimeError(f"nginx refused the config:\n{check.stderr}")
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(config),
                             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(listen_port, 15, proc)
        yield prefix
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful: workers finish their requests
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(prefix, ignore_errors=True)


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode} before it listened")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nginx did not listen on {port} within {timeout:g} s")


def hls_counts(base: str) -> dict:
    """The origin's HLS answers so far: {kind: {"requests", "files"}}."""
    return get_json(base + "/status")["hls_requests"]


def per_file(before: dict, after: dict) -> dict:
    """Origin requests per file version between two hls_counts, per kind (None where no file was new)."""
    out = {}
    for kind in after:
        requests = after[kind]["requests"] - before[kind]["requests"]
        files = after[kind]["files"] - before[kind]["files"]
        out[kind] = {"requests": requests, "files": files, "per_file": round(requests / files, 3) if files else None}
    return out


def start_viewers(port: int, count: int, seconds: float, nice: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(VIEWERS_SCRIPT), "--port", str(port), "--format", "hls",
                             "--count", str(count), "--seconds", str(seconds), "--nice", str(nice)],
                            stdout=subprocess.PIPE, text=True)


def viewer_report(viewers: subprocess.Popen, timeout: float = 120) -> dict:
    out, _ = viewers.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the built-in default model)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--pacer-fps", type=int, default=120,
                   help="output fps; above the generated rate on purpose (the generator runs flat out)")
    p.add_argument("--viewers", type=int, default=200)
    p.add_argument("--viewer-nice", type=int, default=10)
    p.add_argument("--window-s", type=float, default=3.0, help="length of one on or off window")
    p.add_argument("--cycles", type=int, default=3, help="on-off-off-on cycles")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "nginx_crowd.json")
    return p.parse_args()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import serve as serve_bench  # its server start and snapshots (same process, same figures)

    args = parse_args()
    args.extra = "--formats hls"
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is not installed (apt-get install nginx)")
    proc, base = serve_bench.start_server(args)
    listen = serve_bench.free_port()
    try:
        with running_nginx(int(base.rsplit(":", 1)[1]), listen) as prefix:
            time.sleep(3.0)  # past the first chunks' warm-up; the HLS window fills
            ramp = 2.0 + args.viewers * 0.005
            span = ramp + args.cycles * 4 * (args.window_s + 1.5) + 5.0
            counts_before = hls_counts(base)
            viewers = start_viewers(listen, args.viewers, span, args.viewer_nice)
            time.sleep(ramp)
            totals = {state: {"frames": 0, "span_s": 0.0} for state in ("on", "off")}
            for _ in range(args.cycles):
                for state in ("on", "off", "off", "on"):
                    os.kill(viewers.pid, signal.SIGUSR2 if state == "on" else signal.SIGUSR1)
                    time.sleep(1.5 if state == "on" else 1.0)
                    a = get_json(base + "/status")
                    time.sleep(args.window_s)
                    b = get_json(base + "/status")
                    totals[state]["frames"] += b["frames_generated"] - a["frames_generated"]
                    totals[state]["span_s"] += b["last_chunk_at_s"] - a["last_chunk_at_s"]
            os.kill(viewers.pid, signal.SIGUSR2)
            report = viewer_report(viewers)
            origin = per_file(counts_before, hls_counts(base))
            log_lines = (prefix / "access.log").read_text().splitlines()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    fps = {state: t["frames"] / t["span_s"] if t["span_s"] else None for state, t in totals.items()}
    statuses: dict[str, int] = {}
    for line in log_lines:
        fields = line.split()
        key = fields[2] if len(fields) > 2 else "?"
        statuses[key] = statuses.get(key, 0) + 1
    result = {
        "what": "HLS viewers through nginx (deploy/nginx/skyrt.conf) in front of skyrt serve: origin requests "
                "per file version, and generated fps with the crowd on over paused (interleaved)",
        "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "viewers": args.viewers, "size": f"{args.width}x{args.height}", "pacer_fps": args.pacer_fps,
        "origin": origin, "viewer_requests": report["requests"], "viewer_errors": report["errors"],
        "viewer_request_latency_p50_s": report["request_latency_p50_s"],
        "viewer_request_latency_p99_s": report["request_latency_p99_s"],
        "nginx_cache_status": statuses, "generated_fps": fps,
        "fps_ratio_crowd_on_over_paused": fps["on"] / fps["off"] if fps["on"] and fps["off"] else None,
        "windows": totals,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
