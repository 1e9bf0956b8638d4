"""`skyrt fleet` on one machine: generated frames/s per stream with 1, 2 and 4 streams as ratios to
one `skyrt serve` alone, and what the ingress adds to the video path (proxy vs redirect), in one run.

Phases, on a local Ray cluster this script starts in its own process (no dashboard, token auth with
a token of its own, nothing written to ~/.ray):

  1. `skyrt serve` alone (a plain process, no Ray, the fleet's cluster idle): generated fps, flat
     out (the output fps is set above what the model can generate), with the torch threads a stream
     actor gets (Ray sets OMP_NUM_THREADS to its CPUs: 1); once also with torch's default threads.
  2. A fleet of 1, then 2, then 4 streams, each flat out like the baseline: generated fps of every
     stream, read through the ingress's /streams/{id}/status. Each size runs between two serve-alone
     runs and is compared with their mean (this machine's speed drifts with its other tenants).
  3. With one stream at a real output rate (`--video-fps`) and `video: proxy`:
     - added latency per frame: the same MJPEG stream read at once from the stream's own server and
       through the ingress; each frame (matched by its JPEG bytes) arrives later through the ingress
       by the difference.
     - proxy capacity: K MJPEG viewers through the ingress; frames each receives per second against
       the stream's rate, and the CPU the ingress costs (the Serve replica plus Serve's HTTP proxy
       process) per delivered frame, from which the viewer streams one core can carry follows.
  4. The same fleet switched to `video: redirect` (the default): a viewer's cost at the ingress is
     one 307 when it connects; the time to the first MJPEG byte through redirect, proxy and direct.

This machine has 2 cores shared with other tenants: every ratio is taken within this one run.

    python benchmarks/fleet.py                        # built-in model, 32x32, 2 steps
    python benchmarks/fleet.py --height 64 --width 64 --streams 1,2,4 --seconds 20
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from skyrt.runtime.fleet import StreamConfig

sys.path.insert(0, str(Path(__file__).parent))
import serve as serve_benchmark  # noqa: E402  (benchmarks/serve.py: the `skyrt serve` baseline)


STREAM_CPUS = 1  # Ray gives a stream actor OMP_NUM_THREADS = its CPUs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the built-in default model)")
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--streams", default="1,2,4", help="fleet sizes measured, growing")
    p.add_argument("--pacer-fps", type=int, default=120, help="output fps of the generation phases (flat out)")
    p.add_argument("--video-fps", type=int, default=24, help="output fps of the stream in the ingress phases")
    p.add_argument("--viewers", default="1,8,32", help="MJPEG viewers through the proxying ingress")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each measured phase")
    p.add_argument("--connects", type=int, default=20, help="connections timed per path (time to first byte)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fleet.json")
    return p.parse_args()


# ------------------------------------------------------------------------------------ cluster
def start_local_ray(num_cpus: int) -> None:
    """A local Ray cluster in this process, small and quiet, with token auth and a token of its own."""
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
                      RAY_enable_worker_prestart="0", RAY_prestart_worker_first_driver="0")
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.pop("RAY_ADDRESS", None)
    from skyrt.runtime.fleet import api

    api.connect(None, local_cpus=num_cpus, local_gpus=0)


def fleet_config(args, state_dir: str, port: int, video: str, streams: list[str], fps: int):
    from skyrt.runtime.fleet import parse_fleet_config

    return parse_fleet_config({
        "name": "bench", "state_dir": state_dir, "no_token": True, "ingress": {"port": port, "video": video},
        "defaults": stream_keys(args, fps), "streams": [{"id": s} for s in streams]})


def stream_keys(args, fps: int) -> dict:
    keys = {"height": args.height, "width": args.width, "steps": args.steps, "fps": fps, "cpus": STREAM_CPUS,
            "formats": ["mjpeg"], "max_connections_per_address": 1000, "max_connections": 1000}
    return keys | ({"model": args.model} if args.model else {})


def wait_running(fleet, count: int, timeout: float = 300.0) -> list[dict]:
    return fleet.wait_until(lambda s: len(s) == count and all(x["state"] == "running" and x["frames_generated"]
                                                               for x in s), timeout)


# ---------------------------------------------------------------------------------- generation
def stream_rates(url: str, ids: list[str], seconds: float) -> dict[str, float]:
    """Generated frames/s of each stream over `seconds`, from its own /status (through the ingress)."""
    before = {s: serve_benchmark.get_json(f"{url}/streams/{s}/status") for s in ids}
    time.sleep(seconds)
    after = {s: serve_benchmark.get_json(f"{url}/streams/{s}/status") for s in ids}
    return {s: (after[s]["frames_generated"] - before[s]["frames_generated"])
            / (after[s]["uptime_s"] - before[s]["uptime_s"]) for s in ids}


def serve_alone(args, threads: int | None) -> float:
    """Generated fps of one `skyrt serve` process, flat out, after its first-chunk warm-up. threads:
    its OMP_NUM_THREADS (torch's intra-op threads), as Ray gives a stream actor (= its `cpus`), or
    None for torch's default (one per core)."""
    from skyrt.runtime.fleet import parse_fleet_config

    # Every other flag a fleet stream of this benchmark has (formats, connection caps), so that the
    # two run the same `skyrt serve`.
    stream = parse_fleet_config({"streams": [{"id": "x", **stream_keys(args, args.pacer_fps)}]}).streams[0]
    set_here = {"height", "width", "fps", "steps", "model", "max_connections_per_address"}
    extra = StreamConfig(stream.id, {k: v for k, v in stream.serve.items() if k not in set_here}).serve_argv()
    serve_args = argparse.Namespace(pacer_fps=args.pacer_fps, height=args.height, width=args.width, steps=args.steps,
                                    model=args.model, extra=" ".join(extra), seconds=args.seconds)
    saved = os.environ.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:  # the server process takes its environment when it starts, before any measuring
        return serve_benchmark.fresh_server_rate(serve_args)["generated_fps"]
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved


# ------------------------------------------------------------------------------------- MJPEG
class MjpegReader(threading.Thread):
    """Reads an MJPEG stream for `seconds`; records each distinct frame's first arrival time
    (perf_counter, once its last byte is read), keyed by the hash of its JPEG bytes."""

    def __init__(self, url: str, seconds: float):
        super().__init__(daemon=True)
        self.url, self.seconds = url, seconds
        self.arrivals: dict[bytes, float] = {}
        self.frames = 0
        self.error: str | None = None

    def run(self) -> None:
        buffer = bytearray()
        try:
            with urllib.request.urlopen(self.url, timeout=30) as r:
                deadline = time.monotonic() + self.seconds
                while time.monotonic() < deadline:
                    chunk = r.read1(65536)
                    if not chunk:
                        break
                    buffer += chunk
                    self._parts(buffer, time.perf_counter())
        except OSError as err:
            self.error = f"{type(err).__name__}: {err}"

    def _parts(self, buffer: bytearray, now: float) -> None:
        while True:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = bytes(buffer[:head_end]).decode("latin-1")
            length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n")
                           if line.lower().startswith("content-length:")), None)
            if length is None:
                raise ValueError(f"an MJPEG part without Content-Length: {head!r}")
            end = head_end + 4 + length
            if len(buffer) < end + 2:  # the body and the part's trailing CRLF
                return
            digest = hashlib.blake2b(bytes(buffer[head_end + 4:end]), digest_size=16).digest()
            self.arrivals.setdefault(digest, now)
            self.frames += 1
            del buffer[:end + 2]


def added_latency(direct_url: str, ingress_url: str, seconds: float) -> dict:
    """The same frames read directly and through the ingress at once: arrival differences (ms)."""
    direct, through = MjpegReader(direct_url, seconds), MjpegReader(ingress_url, seconds)
    direct.start(), through.start()
    direct.join(), through.join()
    if direct.error or through.error:
        raise RuntimeError(f"a reader failed: direct {direct.error}, ingress {through.error}")
    shared = direct.arrivals.keys() & through.arrivals.keys()
    deltas = sorted((through.arrivals[k] - direct.arrivals[k]) * 1000 for k in shared)
    return {"frames_matched": len(deltas), "frames_direct": direct.frames, "frames_ingress": through.frames,
            "added_ms_p50": round(percentile(deltas, 50), 3), "added_ms_p90": round(percentile(deltas, 90), 3),
            "added_ms_p99": round(percentile(deltas, 99), 3), "added_ms_mean": round(statistics.fmean(deltas), 3)}


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def generator_threads(url: str, ids: list[str]) -> dict[str, str | None]:
    """OMP_NUM_THREADS in each stream's generator process (what Ray set for the actor)."""
    seen = {}
    for sid in ids:
        pid = serve_benchmark.get_json(f"{url}/streams/{sid}/status")["generator_process"]["pid"]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        seen[sid] = next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"OMP_NUM_THREADS=")), None)
    return seen


def ingress_pids() -> list[int]:
    """This cluster's Serve processes on the video path: the ingress replica and Serve's HTTP proxy."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith((b"ray::ServeReplica:skyrt-fleet-bench", b"ray::ProxyActor")):
                pids.append(int(entry))
    return pids


def proxy_capacity(ingress_url: str, viewers: int, seconds: float, fps: int) -> dict:
    """`viewers` MJPEG clients through the proxying ingress: frames each gets per second, and the
    ingress's CPU seconds per delivered frame."""
    pids = ingress_pids()
    readers = [MjpegReader(ingress_url, seconds) for _ in range(viewers)]
    cpu_before, started = sum(serve_benchmark.cpu_seconds(p) for p in pids), time.monotonic()
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    wall = time.monotonic() - started
    cpu = sum(serve_benchmark.cpu_seconds(p) for p in pids) - cpu_before
    failed = [r.error for r in readers if r.error]
    delivered = sum(r.frames for r in readers)
    per_viewer = [r.frames / seconds for r in readers]
    cpu_per_frame = cpu / delivered if delivered else None
    return {"viewers": viewers, "failed": failed, "frames_per_viewer_s_median": round(statistics.median(per_viewer), 2),
            "frames_per_viewer_s_min": round(min(per_viewer), 2), "ratio_to_stream_fps":
            round(statistics.median(per_viewer) / fps, 3), "ingress_cpu_cores": round(cpu / wall, 3),
            "ingress_cpu_ms_per_frame": None if cpu_per_frame is None else round(cpu_per_frame * 1000, 3),
            "viewer_streams_per_ingress_core_at_stream_fps":
            None if not cpu_per_frame else round(1 / (cpu_per_frame * fps), 1),
            "ingress_pids": len(pids)}


def first_byte_s(url: str, count: int) -> dict:
    """Median and p90 seconds from opening `url` (redirects followed) to the first MJPEG byte."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read1(1)
        times.append(time.perf_counter() - started)
    times.sort()
    return {"median_ms": round(statistics.median(times) * 1000, 2), "p90_ms": round(percentile(times, 90) * 1000, 2)}



# -------------------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    sizes = [int(n) for n in args.streams.split(",")]
    viewer_counts = [int(n) for n in args.viewers.split(",")]
    report: dict = {"benchmark": "fleet",
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu"},
                    "config": vars(args) | {"out": args.out.name}}
    steal_before = serve_benchmark.proc_stat_cpu()
    # torch's default threads (one per core) in a `skyrt serve` on this machine, for the record; the
    # ratios' baseline is `skyrt serve` with the threads a stream actor gets (OMP_NUM_THREADS = its 1 CPU).
    default_threads = serve_alone(args, None)
    print(f"skyrt serve alone, default threads: {default_threads:.2f} generated fps", flush=True)

    from skyrt.runtime.fleet import parse_fleet_config, up

    start_local_ray(num_cpus=max(sizes))
    port, state_dir = serve_benchmark.free_port(), tempfile.mkdtemp(prefix="skyrt-fleet-bench-")
    url = f"http://127.0.0.1:{port}"
    settings = {"bind": "127.0.0.1"}
    ids = [f"s{i}" for i in range(max(sizes))]
    fleet = up(fleet_config(args, state_dir, port, "proxy", [], args.pacer_fps), settings=settings)
    try:
        # Each fleet size between two `skyrt serve`-alone runs (the fleet's streams removed, its
        # cluster idle): this machine's speed drifts with its other tenants, so each size is
        # compared with its own neighbours.
        alone = [serve_alone(args, STREAM_CPUS)]
        print(f"skyrt serve alone: {alone[-1]:.2f} generated fps", flush=True)
        generation, threads_seen = {}, {}
        for size in sizes:
            for sid in ids[:size]:
                fleet.add(parse_fleet_config({"streams": [{"id": sid, **stream_keys(args, args.pacer_fps)}],
                                              "no_token": True}).streams[0])
            wait_running(fleet, size)
            time.sleep(3.0)  # past the streams' first-chunk warm-up
            rates = stream_rates(url, ids[:size], args.seconds)
            threads_seen = generator_threads(url, ids[:size])
            for sid in ids[:size]:
                fleet.remove(sid)
            alone.append(serve_alone(args, STREAM_CPUS))
            neighbours = statistics.fmean(alone[-2:])
            mean_rate = statistics.fmean(rates.values())
            generation[str(size)] = {"per_stream_fps": {k: round(v, 2) for k, v in rates.items()},
                                     "mean_per_stream_fps": round(mean_rate, 3), "total_fps": round(sum(rates.values()), 3),
                                     "serve_alone_neighbours_fps": [round(a, 3) for a in alone[-2:]],
                                     "ratio_per_stream_vs_serve_alone": round(mean_rate / neighbours, 3),
                                     "ratio_total_vs_serve_alone": round(sum(rates.values()) / neighbours, 3)}
            print(f"{size} stream(s): {generation[str(size)]}", flush=True)
        # The ingress phases: one stream at a real output rate.
        fleet = up(fleet_config(args, state_dir, port, "proxy", ids[:1], args.video_fps), settings=settings)
        wait_running(fleet, 1)
        time.sleep(3.0)
        (entry,) = fleet.status()
        direct = f"http://{entry['address'][0]}:{entry['address'][1]}/stream.mjpg"  # the stream's own server
        through = f"{url}/streams/s0/stream.mjpg"
        latency = added_latency(direct, through, args.seconds)
        print(f"proxy: added latency per frame {latency}", flush=True)
        capacity = [proxy_capacity(through, n, args.seconds, args.video_fps) for n in viewer_counts]
        for row in capacity:
            print(f"proxy: {row}", flush=True)
        first_byte = {"direct": first_byte_s(direct, args.connects), "proxy": first_byte_s(through, args.connects)}
        fleet = up(fleet_config(args, state_dir, port, "redirect", ids[:1], args.video_fps), settings=settings)
        wait_running(fleet, 1)
        serve_benchmark.get_json(f"{url}/streams")  # the redeployed ingress answers
        first_byte["redirect"] = first_byte_s(through, args.connects)
        print(f"time to first byte: {first_byte}", flush=True)
    finally:
        fleet.down()
        import ray

        ray.shutdown()
    report.update({
        "serve_alone_generated_fps": [round(a, 3) for a in alone],
        "serve_alone_default_threads_generated_fps": round(default_threads, 3),
        "stream_threads": threads_seen,
        "generation": generation,
        "ingress": {"stream_fps": args.video_fps, "proxy_added_latency_per_frame": latency,
                    "proxy_capacity": capacity, "time_to_first_byte": first_byte},
        "cpu_steal_share": round(serve_benchmark.cpu_steal_share(steal_before, serve_benchmark.proc_stat_cpu()), 4),
        "load_average_at_end": os.getloadavg()[0],
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("serve_alone_generated_fps", "generation")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
