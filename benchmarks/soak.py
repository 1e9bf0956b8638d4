"""Soak: hours of `skyrt serve` at its defaults with viewers connecting and leaving; are RSS, fds,
threads and HLS files flat?

One `skyrt serve` (the built-in demo model, every default; only --port is chosen, and the control
token comes by $SKYRT_TOKEN) on 127.0.0.1. In this process, for the whole run, a churn loop keeps a
few viewers connected (a target between --min-viewers and --max-viewers, redrawn every minute),
each living a random few seconds to a minute and then leaving: MJPEG readers, fMP4 readers, HLS
players (playlist + every new segment), LL-HLS players (playlist + every new part), slow readers
that read a little and then stop reading, abandoned connections (a request sent, a few bytes read,
then silence, then a reset) and half-sent requests. Every --sample-s seconds one sample:

* the server's process tree (the server and every descendant: the generator child, FFmpeg
  children): per process RSS (VmRSS), open fds (/proc/PID/fd), threads (Threads: in status); sums;
* HLS files: files in the server's HLS folder on disk, segments listed in the HLS playlist, parts
  and segments listed in the LL-HLS playlist (what the server holds in memory to answer);
* /status: frames generated / output (fps between samples), open connections;
* the churn's own counts: viewers now, connects, disconnects, errors, bytes, per kind.

With --tracemalloc FRAMES the server runs with $SKYRT_TRACEMALLOC (runtime/server/memtrace.py):
every sample adds glibc's heap figures (bytes in use vs held free) and Python's traced total, and
every --tracemalloc-every-s a memory snapshot (GET /debug/memory, with the control token) adds the
allocation sites and object types that grew since the first one (`tracemalloc` in the JSON).
--tracemalloc 0 adds the heap figures and object counts without tracing (RSS stays comparable).

Each sample is appended to --out (JSON, written atomically every sample: a killed run still leaves
its results). At the end (or with --plot-only JSON) a summary per series: the median of the first
10 minutes vs the median of the last 10 minutes, the least-squares slope per hour over the samples
after the first 10 minutes (start-up growth excluded), and a verdict: flat when both the growth
(last - first median) and the slope times one hour stay within the series' stated tolerance
(THRESHOLDS). The plot (matplotlib, `pip install 'skyrt[bench]'`) goes next to the JSON as .png.

    OMP_NUM_THREADS=1 nohup nice -n 19 python benchmarks/soak.py --duration-min 125 > soak.log 2>&1 &
    python benchmarks/soak.py --plot-only benchmarks/results/soak.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from skyrt.runtime.atomic_file import write_atomically

HERE = Path(__file__).resolve().parent
MACHINE = "2-core CPU, shared/loaded with other agents (no GPU)"
WINDOW_S = 600.0  # "first 10 minutes" / "last 10 minutes"
MIB = 1 << 20

# Tolerances of the verdict: a series is flat when last-10-min median - first-10-min median and the
# slope per hour (after the first 10 minutes) both stay within max(relative * first median, absolute).
# Why these: RSS moves by allocator noise and frame-size caches (tens of MiB at most), a leak of one
# connection's buffers per viewer would be hundreds; fds and threads should come back to the same
# counts once viewers leave, up to the few that are connected at the moment of a sample.
THRESHOLDS = {
    "rss_total_bytes": {"relative": 0.10, "absolute": 32 * MIB},
    # The serving process alone (the tree's total hides it under the generator child's ~500 MiB): it
    # holds no state per frame or per viewer, so past start-up only allocator noise should move it.
    "server_rss_bytes": {"relative": 0.0, "absolute": 4 * MIB},
    "fds_total": {"relative": 0.0, "absolute": 12},
    "threads_total": {"relative": 0.0, "absolute": 8},
    "hls_files_on_disk": {"relative": 0.0, "absolute": 4},
    "hls_playlist_segments": {"relative": 0.0, "absolute": 2},
    "llhls_playlist_parts": {"relative": 0.0, "absolute": 8},
}


# ------------------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def get_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode(errors="replace")


def start_server(port: int, log_path: Path, tracemalloc_frames: int | None = None) -> tuple[subprocess.Popen, str]:
    """`skyrt serve --port PORT` at every other default, niced to 19; its log goes to a file.
    With `tracemalloc_frames`, $SKYRT_TRACEMALLOC turns on the server's memory tracing (memtrace.py).
    Returns the process and its control token."""
    token = "soak-" + os.urandom(8).hex()
    env = dict(os.environ, SKYRT_TOKEN=token)
    env.pop("SKYRT_TRACEMALLOC", None)
    if tracemalloc_frames is not None:
        env["SKYRT_TRACEMALLOC"] = str(tracemalloc_frames)
    log = open(log_path, "w")
    return subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "skyrt.runtime.cli", "serve",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env), token


def wait_ready(base: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if get_json(base + "/status")["frames_output"] > 0:
                return
        except (OSError, KeyError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server never produced a frame (its log follows):\n"
                             + log_path.read_text(errors="replace")[-4000:])
        time.sleep(1.0)


# ------------------------------------------------------------------------------ /proc
def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (by /proc/*/stat parent ids), root first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(sorted(parents.get(pid, [])))
    return tree


def process_figures(pid: int) -> dict | None:
    """RSS, open fds, threads and a short command line of one process (None once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        cmd = cmd.replace(sys.executable, "python")  # the report names no path of this machine
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    threads = re.search(r"^Threads:\s+(\d+)", status, re.M)
    return {"pid": pid, "cmd": cmd[:120], "rss_bytes": int(rss.group(1)) * 1024 if rss else 0,
            "fds": fds, "threads": int(threads.group(1)) if threads else 0}


def hls_files_on_disk(server_pid: int) -> int:
    """Files in the server's HLS folder(s) (named skyrt-hls-<pid>-* in the temp folder)."""
    count = 0
    for folder in Path(tempfile.gettempdir()).glob(f"skyrt-hls-{server_pid}-*"):
        count += sum(1 for p in folder.rglob("*") if p.is_file())
    return count


def playlist_counts(base: str) -> dict:
    """Segments listed in the HLS playlist; parts and segments in the LL-HLS playlist."""
    out: dict = {"hls_playlist_segments": None, "llhls_playlist_parts": None, "llhls_playlist_segments": None}
    try:
        text = get_text(base + "/hls/live.m3u8")
        out["hls_playlist_segments"] = sum(1 for ln in text.splitlines() if ln and not ln.startswith("#"))
    except OSError:
        pass
    try:
        text = get_text(base + "/llhls/live.m3u8")
        out["llhls_playlist_parts"] = text.count("#EXT-X-PART:")
        out["llhls_playlist_segments"] = sum(1 for ln in text.splitlines() if ln and not ln.startswith("#"))
    except OSError:
        pass
    return out


# ------------------------------------------------------------------------------ viewers
@dataclass
class Churn:
    """Counts of the viewers this process opened and closed."""
    active: dict = field(default_factory=dict)       # kind -> connected now
    connects: dict = field(default_factory=dict)
    disconnects: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    bytes: dict = field(default_factory=dict)
    last_errors: list = field(default_factory=list)

    def add(self, table: dict, kind: str, n: int = 1) -> None:
        table[kind] = table.get(kind, 0) + n

    def snapshot(self) -> dict:
        return {"active": dict(self.active), "active_total": sum(self.active.values()),
                "connects": dict(self.connects), "disconnects": dict(self.disconnects),
                "errors": dict(self.errors), "bytes": dict(self.bytes), "last_errors": self.last_errors[-5:]}


async def read_stream(session, url: str, seconds: float, churn: Churn, kind: str, pause: float = 0.0) -> None:
    """Read a streaming response for `seconds` (sleeping `pause` between chunks: a slow reader)."""
    import aiohttp
    until = time.monotonic() + seconds
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=30)) as r:
        r.raise_for_status()
        while time.monotonic() < until:
            chunk = await r.content.readany()
            if not chunk:
                break
            churn.add(churn.bytes, kind, len(chunk))
            if pause:
                await asyncio.sleep(pause)


def playlist_uris(text: str) -> list[str]:
    """Media names a playlist lists: segment lines, EXT-X-MAP and EXT-X-PART URIs."""
    names = re.findall(r'URI="([^"]+)"', text)
    names += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return names


async def play_hls(session, base: str, prefix: str, seconds: float, poll: float, churn: Churn, kind: str) -> None:
    """Reload `prefix`live.m3u8 every `poll` s for `seconds`; fetch each newly listed file once."""
    seen: set[str] = set()
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        async with session.get(f"{base}/{prefix}/live.m3u8") as r:
            r.raise_for_status()
            text = await r.text()
        for name in playlist_uris(text):
            if name in seen or "://" in name:
                continue
            seen.add(name)
            async with session.get(f"{base}/{prefix}/{name.lstrip('/')}") as r:
                if r.status == 200:
                    churn.add(churn.bytes, kind, len(await r.read()))
        await asyncio.sleep(poll)


async def raw_abandoned(port: int, seconds: float, churn: Churn, kind: str, half_request: bool) -> None:
    """A raw connection that sends a request (or half of one), reads a little, then goes silent and
    finally resets: what a crashed or suspended client leaves the server."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if half_request:
            writer.write(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Ag")
        else:
            writer.write(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            churn.add(churn.bytes, kind, len(await asyncio.wait_for(reader.read(4096), 30)))
        await writer.drain()
        await asyncio.sleep(seconds)  # never read again: the server's send buffer fills, or it times us out
    finally:
        writer.transport.abort()


KINDS = {  # kind -> weight in the churn
    "mjpeg": 3, "mp4": 2, "hls": 3, "llhls": 2, "slow_mjpeg": 1, "abandoned": 1, "half_request": 1,
}


async def one_viewer(kind: str, session, base: str, port: int, churn: Churn, rng: random.Random) -> None:
    seconds = rng.uniform(3, 60)
    churn.add(churn.connects, kind)
    churn.add(churn.active, kind)
    try:
        if kind == "mjpeg":
            await read_stream(session, base + "/stream.mjpg", seconds, churn, kind)
        elif kind == "mp4":
            await read_stream(session, base + "/stream.mp4", seconds, churn, kind)
        elif kind == "slow_mjpeg":
            await read_stream(session, base + "/stream.mjpg", seconds, churn, kind, pause=2.0)
        elif kind == "hls":
            await play_hls(session, base, "hls", seconds, 1.0, churn, kind)
        elif kind == "llhls":
            await play_hls(session, base, "llhls", seconds, 0.3, churn, kind)
        else:
            await raw_abandoned(port, seconds, churn, kind, half_request=kind == "half_request")
    except Exception as err:  # a viewer's failure is counted, never the soak's end
        churn.add(churn.errors, kind)
        churn.last_errors.append(f"{time.strftime('%H:%M:%S')} {kind}: {type(err).__name__}: {err}"[:300])
    finally:
        churn.add(churn.active, kind, -1)
        churn.add(churn.disconnects, kind)


async def churn_loop(base: str, port: int, churn: Churn, until: float, lo: int, hi: int, seed: int) -> None:
    """Keep between `lo` and `hi` viewers connected (target redrawn every minute) until `until`."""
    import aiohttp
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    tasks: set[asyncio.Task] = set()
    target, redraw = rng.randint(lo, hi), time.monotonic() + 60
    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # a new connection per request: churn
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_read=30)) as s:
        while time.monotonic() < until:
            if time.monotonic() > redraw:
                target, redraw = rng.randint(lo, hi), time.monotonic() + 60
            while len(tasks) < target:
                task = asyncio.create_task(one_viewer(rng.choices(kinds, weights)[0], s, base, port, churn, rng))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(rng.uniform(0.2, 2.0))
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------------------ memory tracing
TOP_SITES = 30  # growing allocation sites / object types kept per memory snapshot


def fetch_memory(base: str, token: str, query: str = "limit=20000") -> dict:
    """The server's GET /debug/memory (every allocation site it traces, object counts, glibc heap)."""
    request = urllib.request.Request(base + "/debug/memory?" + query,
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.load(r)


def site_key(site: dict) -> str:
    """One allocation site's traceback as one string (the allocating line first)."""
    return " <- ".join(site["where"])


def memory_growth(baseline: dict, now: dict, top: int = TOP_SITES) -> dict:
    """What grew between two /debug/memory answers: the `top` allocation sites and object types by
    growth (bytes, objects), and the change of Python's traced total and of glibc's heap figures."""
    before = {site_key(s): s for s in baseline.get("sites", [])}
    rows = []
    for site in now.get("sites", []):
        old = before.pop(site_key(site), {"size": 0, "count": 0})
        rows.append((site["size"] - old["size"], site["count"] - old["count"], site))
    rows += [(-old["size"], -old["count"], dict(old, size=0, count=0)) for old in before.values()]  # sites gone
    rows.sort(key=lambda r: r[0], reverse=True)
    types_before = baseline.get("object_types", {})
    types = sorted(((n - types_before.get(name, 0), name, n) for name, n in now.get("object_types", {}).items()),
                   reverse=True)
    heap_before, heap_now = baseline.get("heap") or {}, now.get("heap") or {}
    return {"traced_bytes_growth": now.get("traced_bytes", 0) - baseline.get("traced_bytes", 0),
            "heap_growth": {k: heap_now[k] - heap_before[k] for k in heap_now if k in heap_before},
            "top_growing_sites": [{"size_growth": d, "count_growth": c, "size": s["size"], "count": s["count"],
                                   "where": s["where"]} for d, c, s in rows[:top]],
            "top_shrinking_sites": [{"size_growth": d, "count_growth": c, "where": s["where"]}
                                    for d, c, s in sorted(rows, key=lambda r: r[0])[:5] if d < 0],
            "top_growing_types": [{"type": name, "growth": d, "count": n} for d, name, n in types[:top] if d > 0]}


def memory_entry(base: str, token: str, t_s: float, server_rss: int, state: dict) -> dict:
    """One memory snapshot: Python's totals and glibc's heap now, growth since the baseline snapshot
    (the first one taken; kept whole in `state`, only its totals go into the report)."""
    now = fetch_memory(base, token)
    entry = {"t_s": t_s, "server_rss_bytes": server_rss, "traced_bytes": now.get("traced_bytes"),
             "tracemalloc_overhead_bytes": now.get("tracemalloc_overhead_bytes"), "sites_total": now.get("sites_total"),
             "heap": now.get("heap")}
    if "baseline" not in state:
        state["baseline"] = now
        entry["baseline"] = True
    else:
        entry |= {"since_baseline_s": round(t_s - state["baseline_t_s"], 1),
                  "server_rss_growth": server_rss - state["baseline_rss"], **memory_growth(state["baseline"], now)}
    state.setdefault("baseline_t_s", t_s)
    state.setdefault("baseline_rss", server_rss)
    return entry


# ------------------------------------------------------------------------------ sampling
def take_sample(base: str, server_pid: int, t0: float, churn: Churn, previous: dict | None,
                token: str | None = None) -> dict:
    procs = [f for f in (process_figures(pid) for pid in process_tree(server_pid)) if f is not None]
    sample: dict = {"t_s": round(time.monotonic() - t0, 1), "time": time.time(), "processes": procs,
                    "rss_total_bytes": sum(p["rss_bytes"] for p in procs),
                    "server_rss_bytes": procs[0]["rss_bytes"] if procs and procs[0]["pid"] == server_pid else None,
                    "fds_total": sum(p["fds"] for p in procs), "threads_total": sum(p["threads"] for p in procs),
                    "hls_files_on_disk": hls_files_on_disk(server_pid)}
    sample |= playlist_counts(base)
    try:
        status = get_json(base + "/status")
        sample |= {"frames_generated": status.get("frames_generated"), "frames_output": status.get("frames_output"),
                   "connections_open": (status.get("connections") or {}).get("open"),
                   # refused / shed for idleness: how the server dealt with the abandoned viewers
                   "connections_refused": (status.get("connections") or {}).get("refused"),
                   "connections_idle_shed": (status.get("connections") or {}).get("idle_shed"),
                   "server_reported_rss_bytes": status.get("resident_memory_bytes"),
                   "server_reported_fds": status.get("open_fds")}
    except (OSError, ValueError) as err:
        sample["status_error"] = f"{type(err).__name__}: {err}"
    if previous and sample.get("frames_generated") is not None and previous.get("frames_generated") is not None:
        dt = sample["t_s"] - previous["t_s"]
        sample["generated_fps"] = round((sample["frames_generated"] - previous["frames_generated"]) / dt, 3)
        sample["output_fps"] = round((sample["frames_output"] - previous["frames_output"]) / dt, 3)
    if token is not None:  # memory debugging on: glibc's heap and Python's traced total (no snapshot: cheap)
        try:
            memory = fetch_memory(base, token, "limit=0&types=0")
            sample |= {"heap": memory.get("heap"), "traced_bytes": memory.get("traced_bytes")}
        except (OSError, ValueError) as err:
            sample["memory_error"] = f"{type(err).__name__}: {err}"
    sample["viewers"] = churn.snapshot()
    return sample


def save(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, (json.dumps(report, indent=1) + "\n").encode())


async def soak(args) -> dict:
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.gettempdir()) / f"soak-serve-{port}.log"
    report = {"benchmark": "soak", "machine": MACHINE, "host": platform.node(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "config": {"server": "skyrt serve --port PORT (all defaults: built-in demo model), nice -n 19",
                         "duration_min": args.duration_min, "sample_s": args.sample_s,
                         "viewers": [args.min_viewers, args.max_viewers], "kinds": KINDS, "seed": args.seed,
                         "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "thresholds": THRESHOLDS, "samples": [], "complete": False}
    proc, token = start_server(port, log_path, args.tracemalloc)
    report["server_pid"] = proc.pid
    traced: dict = {}  # the baseline memory snapshot (memory_entry)
    if args.tracemalloc is not None:
        report["config"] |= {"tracemalloc_frames": args.tracemalloc, "tracemalloc_every_s": args.tracemalloc_every_s,
                             "tracemalloc_first_s": args.tracemalloc_first_s}
        report["tracemalloc"] = {"snapshots": [],
                                 "note": "growth = latest snapshot minus the first (baseline) one; the server "
                                         "runs with $SKYRT_TRACEMALLOC, which slows it and grows its RSS by "
                                         "the tracer's own tables (tracemalloc_overhead_bytes)"}
    try:
        wait_ready(base, proc, log_path, args.ready_timeout)
        t0 = time.monotonic()
        until = t0 + args.duration_min * 60
        churn = Churn()
        viewers = asyncio.create_task(churn_loop(base, port, churn, until, args.min_viewers, args.max_viewers, args.seed))
        previous = None
        while time.monotonic() < until and proc.poll() is None:
            sample = await asyncio.to_thread(take_sample, base, proc.pid, t0, churn, previous,
                                             token if args.tracemalloc is not None else None)
            report["samples"].append(sample)
            report["duration_s"] = sample["t_s"]
            save(report, args.out)
            print(f"[{sample['t_s']:7.0f}s] rss {sample['rss_total_bytes'] / MIB:7.1f} MiB fds {sample['fds_total']:4d} "
                  f"threads {sample['threads_total']:4d} hls files {sample['hls_files_on_disk']:3d} "
                  f"fps {sample.get('generated_fps')} viewers {sample['viewers']['active_total']} "
                  f"connects {sum(sample['viewers']['connects'].values())}", flush=True)
            taken = len(report.get("tracemalloc", {}).get("snapshots", []))
            if args.tracemalloc is not None and sample["t_s"] >= args.tracemalloc_first_s + args.tracemalloc_every_s * taken:
                server_rss = sample["processes"][0]["rss_bytes"] if sample["processes"] else 0
                try:
                    entry = await asyncio.to_thread(memory_entry, base, token, sample["t_s"], server_rss, traced)
                except (OSError, ValueError) as err:
                    entry = {"t_s": sample["t_s"], "error": f"{type(err).__name__}: {err}"}
                report["tracemalloc"]["snapshots"].append(entry)
                report["tracemalloc"]["latest_growth"] = {k: entry[k] for k in entry if k != "heap"}
                save(report, args.out)
                print(f"  memory: traced {(entry.get('traced_bytes') or 0) / MIB:.1f} MiB, growth since baseline "
                      f"{(entry.get('traced_bytes_growth') or 0) / MIB:+.2f} MiB traced, "
                      f"{(entry.get('server_rss_growth') or 0) / MIB:+.2f} MiB RSS", flush=True)
            if viewers.done():
                viewers.result()  # the churn loop itself failing is a bug in this script: show it
            previous = sample
            await asyncio.sleep(max(0.0, args.sample_s - (time.monotonic() - t0 - sample["t_s"])))
        report["server_exit"] = proc.poll()
        viewers.cancel()
        await asyncio.gather(viewers, return_exceptions=True)
        report["complete"] = proc.poll() is None and time.monotonic() >= until
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        report["server_log_tail"] = log_path.read_text(errors="replace")[-3000:]
        save(report, args.out)
    return report


# ------------------------------------------------------------------------------ summary and plot
def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, in value per hour."""
    if len(points) < 2:
        return None
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in points) / den * 3600.0


def series_value(sample: dict, name: str):
    """One series' value in a sample; the serving process's RSS from its process list (samples of
    runs before that series existed have it there too)."""
    if name == "server_rss_bytes" and sample.get(name) is None:
        return sample["processes"][0]["rss_bytes"] if sample.get("processes") else None
    return sample.get(name)


def summarize(samples: list[dict], window_s: float = WINDOW_S, thresholds: dict = THRESHOLDS) -> dict:
    """Per series: first/last window medians, slope per hour after the first window, a flat verdict."""
    if not samples:
        return {"flat": None, "reason": "no samples", "series": {}}
    end = samples[-1]["t_s"]
    series = {}
    for name, tol in thresholds.items():
        points = [(s["t_s"], float(v)) for s in samples if (v := series_value(s, name)) is not None]
        if not points:
            continue
        first = [v for t, v in points if t <= window_s]
        last = [v for t, v in points if t >= end - window_s]
        after = [(t, v) for t, v in points if t > window_s] or points
        first_median, last_median = statistics.median(first or [points[0][1]]), statistics.median(last)
        slope = slope_per_hour(after)
        allowed = max(tol["relative"] * first_median, tol["absolute"])
        growth = last_median - first_median
        flat = growth <= allowed and (slope is None or slope <= allowed)
        series[name] = {"first_10min_median": first_median, "last_10min_median": last_median, "growth": growth,
                        "slope_per_hour": slope, "allowed": allowed, "flat": flat}
    # A run shorter than two windows compares a window with itself and extrapolates minutes of noise
    # to an hour: no verdict (None) rather than a meaningless one; the series figures stay.
    overlap = end < 2 * window_s
    flat = None if overlap else all(s["flat"] for s in series.values())
    return {"flat": flat, "duration_s": end, "windows_overlap": overlap,
            "rule": "flat: last-10-min median - first-10-min median <= allowed and slope per hour (least "
                    "squares over samples after the first 10 min) <= allowed; allowed = max(relative x "
                    "first median, absolute)", "series": series}


def process_role(samples: list[dict], rank: int) -> str:
    """A legend name for the rank-th process of the tree (root first), from its command line."""
    for sample in samples:
        if rank < len(sample["processes"]):
            cmd = sample["processes"][rank].get("cmd", "")
            if rank == 0:
                return "server"
            for needle, role in (("resource_tracker", "resource tracker"), ("spawn_main", "generator"),
                                 ("ffmpeg", "ffmpeg")):
                if needle in cmd:
                    return role
            return f"child {rank}"
    return f"child {rank}"


def plot(report: dict, png: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'skyrt[bench]')")
        return False
    samples = report["samples"]
    hours = [s["t_s"] / 3600 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    panels = [("RSS (MiB), server process tree", [("rss_total_bytes", "total", MIB)], "per_process_rss"),
              ("open fds", [("fds_total", "total", 1)], "per_process_fds"),
              ("threads", [("threads_total", "total", 1)], "per_process_threads"),
              ("HLS files", [("hls_files_on_disk", "on disk", 1), ("hls_playlist_segments", "HLS playlist segments", 1),
                             ("llhls_playlist_parts", "LL-HLS playlist parts", 1)], None)]
    for ax, (title, lines, per_process) in zip(axes, panels):
        for key, label, scale in lines:
            ax.plot(hours, [None if s.get(key) is None else s[key] / scale for s in samples], label=label)
        if per_process:
            field_name = {"per_process_rss": ("rss_bytes", MIB), "per_process_fds": ("fds", 1),
                          "per_process_threads": ("threads", 1)}[per_process]
            for rank in range(max((len(s["processes"]) for s in samples), default=0)):
                ys = [s["processes"][rank][field_name[0]] / field_name[1] if rank < len(s["processes"]) else None
                      for s in samples]
                ax.plot(hours, ys, linewidth=0.8, linestyle="--", label=process_role(samples, rank))
        figures = report.get("summary", {}).get("series", {}).get(lines[0][0])
        if figures:
            scale = lines[0][2]
            title += (f": first 10 min {figures['first_10min_median'] / scale:.1f}, last 10 min "
                      f"{figures['last_10min_median'] / scale:.1f}, slope "
                      f"{(figures['slope_per_hour'] or 0) / scale:+.1f}/h (allowed {figures['allowed'] / scale:.1f})")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    verdict = report.get("summary", {}).get("flat")
    axes[-1].set_xlabel("hours since the first frame")
    fig.suptitle(f"skyrt serve soak ({report.get('machine')}), flat: {verdict}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def finish(report: dict, out: Path) -> None:
    report["summary"] = summarize(report["samples"])
    save(report, out)
    plot(report, out.with_suffix(".png"))
    for name, s in report["summary"]["series"].items():
        print(f"{name:24s} first {s['first_10min_median']:14.1f} last {s['last_10min_median']:14.1f} "
              f"slope/h {s['slope_per_hour'] if s['slope_per_hour'] is None else round(s['slope_per_hour'], 1)} "
              f"allowed {s['allowed']:.1f} flat {s['flat']}")
    print("flat:", report["summary"]["flat"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-min", type=float, default=120.0)
    p.add_argument("--sample-s", type=float, default=30.0)
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    p.add_argument("--min-viewers", type=int, default=2)
    p.add_argument("--max-viewers", type=int, default=8)
    p.add_argument("--seed", type=int, default=36)
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the first frame")
    p.add_argument("--tracemalloc", type=int, default=None, metavar="FRAMES",
                   help="trace the serving process's Python allocations (tracemalloc, tracebacks FRAMES deep; "
                        "slows it) and write the allocation sites and object types that grow, and glibc's heap "
                        "figures per sample, into the JSON; 0: heap figures and object counts only, no "
                        "tracing; default off")
    p.add_argument("--tracemalloc-every-s", type=float, default=300.0, help="seconds between memory snapshots")
    p.add_argument("--tracemalloc-first-s", type=float, default=300.0,
                   help="when the first (baseline) memory snapshot is taken: after start-up growth")
    p.add_argument("--plot-only", type=Path, default=None, metavar="JSON", help="summarize and plot an existing run")
    args = p.parse_args()
    if args.plot_only is not None:
        report = json.loads(args.plot_only.read_text())
        finish(report, args.plot_only)
        return
    report = asyncio.run(soak(args))
    finish(report, args.out)


if __name__ == "__main__":
    main()
