"""`skyrt serve` under viewer load: generated frames/s with 0, 10, 50 and 200 MJPEG and HLS viewers,
as ratios to no viewers, in one run; then connect/disconnect cycles with a stalled client.

Starts a real server process on loopback and lets the generator run flat out (the output fps is set
above what the model can generate, so the generated rate is the model's rate under that load).
Viewers run in a second process (benchmarks/viewers.py, at lower CPU priority, standing in for
players on other machines; its CPU time is reported). "No viewers" is measured before and after
every viewer phase and each phase's ratio is against the mean of its two neighbours; the figure is
the median over `--rounds` rounds (this machine's speed drifts with other tenants; the hypervisor's
CPU steal over the run is recorded). Each phase
also records the server's own CPU use and the generator's busy-time rate (frames / seconds spent
generating chunks). Then, for `--interleaved` counts, the same ratio with drift cancelled: the viewers
are paused and resumed every few seconds (measure_interleaved).
Writes JSON.

    python benchmarks/serve.py                          # built-in default model, serve settings, 128x128
    python benchmarks/serve.py --model DIR --height 32 --width 32 --steps 2 --seconds 10 --viewers 10,50
    python benchmarks/serve.py --baseline-python OTHER/.venv/bin/python --rounds 3 --seconds 40 \
        --out benchmarks/results/serve_versions.json   # this install vs another, no viewers, ABBA order
    python benchmarks/serve.py --baseline-python OTHER/.venv/bin/python --compare-viewers hls:200,mjpeg:200 \
        --rounds 2 --out benchmarks/results/serve_viewers_versions.json   # ... and what viewers cost each
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from statistics import median

VIEWERS_SCRIPT = Path(__file__).with_name("viewers.py")
FORMATS = ("mjpeg", "hls")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the built-in default model)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: serve's default)")
    p.add_argument("--extra", default="", help="more `skyrt serve` flags, e.g. '--mode window'")
    p.add_argument("--pacer-fps", type=int, default=120, help="output fps; above the generated rate on purpose")
    p.add_argument("--viewers", default="10,50,200", help="viewer counts, each run for MJPEG and for HLS")
    p.add_argument("--viewer-nice", type=int, default=10, help="CPU priority the viewer process gives up")
    p.add_argument("--seconds", type=float, default=12.0, help="length of each measured phase")
    p.add_argument("--rounds", type=int, default=2, help="times every viewer phase is measured (median taken)")
    p.add_argument("--cycles", type=int, default=200, help="connect/disconnect cycles")
    p.add_argument("--interleaved", default="200", help="viewer counts also measured interleaved (see "
                   "measure_interleaved), each for MJPEG and for HLS; '' for none")
    p.add_argument("--interleave-s", type=float, default=3.0, help="length of one on or off window")
    p.add_argument("--interleave-cycles", type=int, default=8, help="on-off-off-on cycles per interleaved run")
    p.add_argument("--baseline-python", default=None,
                   help="instead of viewer phases: generated fps with no viewers of this install's `skyrt serve` "
                        "against the one this interpreter runs (another checkout's venv), servers started in "
                        "ABBA order, `--rounds` times")
    p.add_argument("--compare-viewers", default="",
                   help="with --baseline-python: viewer phases each server also plays, e.g. 'hls:200,mjpeg:200'")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    return p.parse_args()


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def get_json(url: str) -> dict:
    return json.loads(get_text(url))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, python: str = sys.executable) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [python, "-m", "skyrt.runtime.cli", "serve", "--port", str(port), "--fps", str(args.pacer_fps),
           "--height", str(args.height), "--width", str(args.width), "--no-token",
           "--max-connections-per-address", "1000", *args.extra.split()]
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


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU seconds of a process, all its threads, and (children=True) its live children
    (the generator process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if not children:
        return own
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(cpu_seconds(int(child)) for child in kids if Path(f"/proc/{child}").exists())


def busy_seconds(base: str) -> float:
    """Seconds the generator has spent generating chunks (the latency histogram's sum)."""
    return float(re.search(r"^skyrt_chunk_latency_seconds_sum (\S+)$", get_text(base + "/metrics"), re.M).group(1))


def snapshot(base: str, pid: int) -> dict:
    status = get_json(base + "/status")
    return {"status": status, "busy_s": busy_seconds(base), "cpu_s": cpu_seconds(pid),
            "serving_cpu_s": cpu_seconds(pid, children=False), "t": time.monotonic()}


def rate(before: dict, after: dict) -> dict:
    """Generation figures between two snapshots."""
    a, b = before["status"], after["status"]
    frames = b["frames_generated"] - a["frames_generated"]
    wall = after["t"] - before["t"]
    busy = after["busy_s"] - before["busy_s"]
    # Frames arrive a chunk (~a dozen frames) at a time: counting them over the snapshots' wall time
    # would be off by up to a chunk per phase (~8% of a 10 s phase at 20 fps). Between the two snapshots'
    # last chunk boundaries the count is exact (an older install without that field: wall time).
    if a.get("last_chunk_at_s") is not None and b.get("last_chunk_at_s") is not None:
        chunk_span = b["last_chunk_at_s"] - a["last_chunk_at_s"]
    else:
        chunk_span = b["uptime_s"] - a["uptime_s"]
    return {"generated_fps": frames / chunk_span if frames else 0.0,
            "generator_busy_fps": frames / busy if busy > 0 else None,
            "server_cpu_cores": (after["cpu_s"] - before["cpu_s"]) / wall,  # server + generator process
            # The serving process alone (HTTP, pacer, encoders): what the viewers cost, less noisy than fps.
            "serving_cpu_cores": (after["serving_cpu_s"] - before["serving_cpu_s"]) / wall,
            "chunk_latency_p50_s": b["chunk_latency_p50_s"], "chunk_latency_p99_s": b["chunk_latency_p99_s"],
            "clients": b["clients"], "client_drops": b["client_drops"], "client_write_timeouts":
            b["client_write_timeouts"] - a["client_write_timeouts"], "open_fds": b["open_fds"],
            "resident_memory_mb": b["resident_memory_bytes"] / 1e6}


def mean(runs: list[dict], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def measure_alone(base: str, pid: int, seconds: float) -> dict:
    before = snapshot(base, pid)
    time.sleep(seconds)
    return rate(before, snapshot(base, pid))


def fresh_server_rate(args, python: str = sys.executable) -> dict:
    """Start a server, let it past its first-chunk warm-up, measure `args.seconds` with no viewers,
    stop it (SIGTERM)."""
    proc, base = start_server(args, python)
    try:
        time.sleep(3.0)
        return measure_alone(base, proc.pid, args.seconds)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def measure_viewers(base: str, pid: int, fmt: str, count: int, args) -> dict:
    """Start `count` viewers of `fmt`, let them connect, measure `args.seconds`, collect their report."""
    ramp = 2.0 + count * 0.005
    viewers = subprocess.Popen(
        [sys.executable, str(VIEWERS_SCRIPT), "--port", base.rsplit(":", 1)[1], "--format", fmt, "--count",
         str(count), "--seconds", str(ramp + args.seconds + 1.0), "--nice", str(args.viewer_nice)],
        stdout=subprocess.PIPE, text=True)
    time.sleep(ramp)
    before = snapshot(base, pid)
    time.sleep(args.seconds)
    measured = rate(before, snapshot(base, pid))
    out, _ = viewers.communicate(timeout=120)
    report = json.loads(out.strip().splitlines()[-1])
    return dict(measured, viewer_process=report)


def bracketed_viewer_phase(base: str, pid: int, fmt: str, count: int, args, alone_runs: list[dict]) -> dict:
    """A viewer phase followed by a no-viewer one (appended to `alone_runs`, which must already end with
    the no-viewer phase before it); the phase's figures relative to those two neighbours."""
    phase = measure_viewers(base, pid, fmt, count, args)
    time.sleep(2.0)  # the viewers' sockets close
    alone_runs.append(measure_alone(base, pid, args.seconds))
    neighbours = alone_runs[-2:]
    phase["ratio"] = phase["generated_fps"] / mean(neighbours, "generated_fps")
    phase["busy_ratio"] = phase["generator_busy_fps"] / mean(neighbours, "generator_busy_fps")
    phase["no_viewers_neighbours_fps"] = [a["generated_fps"] for a in neighbours]
    phase["serving_cpu_cores_added"] = phase["serving_cpu_cores"] - mean(neighbours, "serving_cpu_cores")
    phase["viewer_process_cpu_cores"] = phase["viewer_process"]["cpu_s"] / phase["viewer_process"]["seconds"]
    return phase


# Seconds after a pause before an "off" window starts (MJPEG viewers hang up, their last bytes drain)
# and after a resume before an "on" window starts (MJPEG viewers reconnect).
PAUSE_SETTLE_S, RESUME_SETTLE_S = 1.0, 1.5


def measure_interleaved(base: str, pid: int, fmt: str, count: int, args) -> dict:
    """`count` viewers of `fmt` paused (SIGUSR1: MJPEG viewers hang up, HLS viewers stop asking) and
    resumed (SIGUSR2) every `args.interleave_s` seconds, `args.interleave_cycles` times in on-off-off-on
    order. Generated fps with the viewers on over fps with them paused: drift slower than a few seconds
    (this machine's speed wanders ±15% over tens of seconds) hits both alike. (Stopping the viewer
    process instead does not work for MJPEG: the server keeps writing into the stopped viewer's kernel
    buffers, which autotune to megabytes, for minutes.)"""
    ramp = 2.0 + count * 0.005
    span = ramp + args.interleave_cycles * 2 * (2 * args.interleave_s + PAUSE_SETTLE_S + RESUME_SETTLE_S) + 5.0
    viewers = subprocess.Popen(
        [sys.executable, str(VIEWERS_SCRIPT), "--port", base.rsplit(":", 1)[1], "--format", fmt, "--count",
         str(count), "--seconds", str(span), "--nice", str(args.viewer_nice)], stdout=subprocess.PIPE, text=True)
    time.sleep(ramp)
    totals = {state: {"frames": 0, "span_s": 0.0, "serving_cpu_s": 0.0, "wall_s": 0.0} for state in ("on", "off")}
    try:
        for _ in range(args.interleave_cycles):
            for state in ("on", "off", "off", "on"):
                os.kill(viewers.pid, signal.SIGUSR2 if state == "on" else signal.SIGUSR1)
                time.sleep(RESUME_SETTLE_S if state == "on" else PAUSE_SETTLE_S)
                before = snapshot(base, pid)
                time.sleep(args.interleave_s)
                after = snapshot(base, pid)
                window = totals[state]
                window["frames"] += after["status"]["frames_generated"] - before["status"]["frames_generated"]
                window["span_s"] += after["status"]["last_chunk_at_s"] - before["status"]["last_chunk_at_s"]
                window["serving_cpu_s"] += after["serving_cpu_s"] - before["serving_cpu_s"]
                window["wall_s"] += after["t"] - before["t"]
    finally:
        viewers.kill()
        viewers.wait(timeout=60)
    fps = {state: t["frames"] / t["span_s"] for state, t in totals.items()}
    cores = {state: t["serving_cpu_s"] / t["wall_s"] for state, t in totals.items()}
    return {"format": fmt, "viewers": count, "generated_fps": fps, "ratio": fps["on"] / fps["off"],
            "serving_cpu_cores": cores, "serving_cpu_cores_added": cores["on"] - cores["off"], "windows": totals}


def viewer_side(phase: dict) -> dict:
    """What the viewers of a phase got, per viewer: requests/s and HLS request latency, or MJPEG frames/s
    (a slower server shows here first: a starved viewer asks and receives less)."""
    v = phase["viewer_process"]
    per_viewer_s = v["viewers"] * v["seconds"]
    if v["format"] == "hls":
        return {"requests_per_s": round(v["requests"] / per_viewer_s, 2), "latency_p50_s": v["request_latency_p50_s"],
                "latency_p99_s": v["request_latency_p99_s"], "errors": v["errors"]}
    return {"frames_per_s": round(v["mjpeg_parts"] / per_viewer_s, 2), "errors": v["errors"]}


def connect_cycles(base: str, cycles: int) -> float:
    """Open and drop `cycles` stream connections (one client stalled throughout); seconds taken."""
    stalled = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
    stalled.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # never reads
    started = time.perf_counter()
    for i in range(cycles):
        with urllib.request.urlopen(base + ("/stream.mjpg", "/stream.mp4")[i % 2], timeout=30) as r:
            r.read1(100)
    took = time.perf_counter() - started
    stalled.close()
    return took


def cpu_steal_share(before: list[int], after: list[int]) -> float:
    """Share of this machine's CPU time the hypervisor took (/proc/stat 'steal') between two readings."""
    total = sum(after) - sum(before)
    return (after[7] - before[7]) / total if total else 0.0


def proc_stat_cpu() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def fresh_server_viewer_phases(args, python: str, specs: list[tuple[str, int]]) -> dict:
    """Start a server, then no viewers / each (format, count) of `specs` / no viewers ... in turn; stop it."""
    proc, base = start_server(args, python)
    try:
        time.sleep(3.0)
        alone_runs = [measure_alone(base, proc.pid, args.seconds)]
        phases = {f"{fmt}_{count}": bracketed_viewer_phase(base, proc.pid, fmt, count, args, alone_runs)
                  for fmt, count in specs}
        return dict(phases, no_viewers=alone_runs)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def compare_installs(args) -> None:
    """Two installs (this interpreter's and --baseline-python's), each server started afresh, in ABBA
    order per round so drift hits both alike. Without --compare-viewers: no-viewer generated fps, and the
    ratio this/baseline. With it: each server also plays those viewer phases, and each install's
    ratios to its own no-viewer neighbours and the serving CPU the viewers added are reported side by side."""
    specs = [(fmt, int(count)) for fmt, count in (spec.split(":") for spec in args.compare_viewers.split(",")
                                                   if spec.strip())]
    runs: dict[str, list] = {"this": [], "baseline": []}
    pythons = {"this": sys.executable, "baseline": args.baseline_python}
    for round_ in range(args.rounds):
        for label in ("this", "baseline", "baseline", "this") if round_ % 2 == 0 else ("baseline", "this", "this",
                                                                                       "baseline"):
            if specs:
                runs[label].append(fresh_server_viewer_phases(args, pythons[label], specs))
                print(f"round {round_ + 1}: {label}: " + ", ".join(
                    f"{key} {phase['ratio']:.3f} of no viewers, +{phase['serving_cpu_cores_added']:.3f} serving cores"
                    for key, phase in runs[label][-1].items() if key != "no_viewers"), flush=True)
                continue
            runs[label].append(fresh_server_rate(args, pythons[label]))
            print(f"round {round_ + 1}: {label}: {runs[label][-1]['generated_fps']:.2f} fps", flush=True)
    if specs:
        return write_viewer_comparison(args, specs, runs)
    fps = {label: [r["generated_fps"] for r in rs] for label, rs in runs.items()}
    report = {
        "benchmark": "serve_versions",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu",
                    "load_average_at_end": os.getloadavg()[0]},
        # No machine paths in results: the baseline is whatever install --baseline-python named.
        "config": vars(args) | {"out": args.out.name, "baseline_python": "given"},
        "generated_fps": fps,
        "ratio_this_vs_baseline": round(mean(runs["this"], "generated_fps") / mean(runs["baseline"], "generated_fps"),
                                        3),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("generated_fps", "ratio_this_vs_baseline")}, indent=2))
    print(f"wrote {args.out}")


def write_viewer_comparison(args, specs: list[tuple[str, int]], runs: dict[str, list]) -> None:
    def summary(label: str, key: str, field: str) -> float:
        return round(median(run[key][field] for run in runs[label]), 3)

    keys = [f"{fmt}_{count}" for fmt, count in specs]
    report = {
        "benchmark": "serve_versions_viewers",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu",
                    "load_average_at_end": os.getloadavg()[0]},
        "config": vars(args) | {"out": args.out.name, "baseline_python": "given"},
        # Per install, median over its servers: generated fps with the viewers over its no-viewer
        # neighbours, and the serving process's CPU (cores) the viewers added.
        "ratio_generated_fps_vs_no_viewers": {label: {key: summary(label, key, "ratio") for key in keys}
                                              for label in runs},
        "serving_cpu_cores_added_by_viewers": {label: {key: summary(label, key, "serving_cpu_cores_added")
                                                       for key in keys} for label in runs},
        "serving_cpu_added_this_vs_baseline": {key: round(summary("this", key, "serving_cpu_cores_added")
                                                          / summary("baseline", key, "serving_cpu_cores_added"), 3)
                                               for key in keys},
        "viewers_served": {label: {key: viewer_side(runs[label][-1][key]) for key in keys} for label in runs},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("ratio_generated_fps_vs_no_viewers", "serving_cpu_cores_added_by_viewers",
                                             "serving_cpu_added_this_vs_baseline", "viewers_served")}, indent=2))
    print(f"wrote {args.out}")


def main() -> None:
    args = parse_args()
    if args.baseline_python:
        return compare_installs(args)
    counts = [int(c) for c in args.viewers.split(",") if c.strip()]
    proc, base = start_server(args)
    phases: dict[str, list] = {f"{fmt}_{c}": [] for fmt in FORMATS for c in counts}
    alone_runs: list[dict] = []
    steal_before = proc_stat_cpu()
    try:
        time.sleep(3.0)  # past the first-chunk warm-up
        # No viewers before and after every viewer phase: the machine's speed drifts (other tenants),
        # so each phase is compared with its own two neighbours, and each ratio is the median of rounds.
        alone_runs.append(measure_alone(base, proc.pid, args.seconds))
        for round_ in range(args.rounds):
            for fmt in FORMATS:
                for count in counts:
                    phase = bracketed_viewer_phase(base, proc.pid, fmt, count, args, alone_runs)
                    phases[f"{fmt}_{count}"].append(phase)
                    print(f"round {round_ + 1}: {fmt} x{count}: {phase['generated_fps']:.1f} fps, "
                          f"{phase['ratio']:.3f} of no viewers; viewers: {viewer_side(phase)}", flush=True)
        interleaved = {}
        for count in [int(c) for c in args.interleaved.split(",") if c.strip()]:
            for fmt in FORMATS:
                run = measure_interleaved(base, proc.pid, fmt, count, args)
                interleaved[f"{fmt}_{count}"] = run
                print(f"interleaved: {fmt} x{count}: {run['ratio']:.3f} of paused viewers, "
                      f"+{run['serving_cpu_cores_added']:.3f} serving cores", flush=True)
                time.sleep(2.0)
        cycles_s = connect_cycles(base, args.cycles)
        time.sleep(2.0)
        after = measure_alone(base, proc.pid, 2.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)
    ratios = {fmt: {str(c): round(median(p["ratio"] for p in phases[f"{fmt}_{c}"]), 3) for c in counts}
              for fmt in FORMATS}
    busy_ratios = {fmt: {str(c): round(median(p["busy_ratio"] for p in phases[f"{fmt}_{c}"]), 3) for c in counts}
                   for fmt in FORMATS}
    cores_added = {fmt: {str(c): round(median(p["serving_cpu_cores_added"] for p in phases[f"{fmt}_{c}"]), 3)
                         for c in counts} for fmt in FORMATS}
    viewer_cores = {fmt: {str(c): round(median(p["viewer_process_cpu_cores"] for p in phases[f"{fmt}_{c}"]), 3)
                          for c in counts} for fmt in FORMATS}
    served = {fmt: {str(c): viewer_side(phases[f"{fmt}_{c}"][-1]) for c in counts} for fmt in FORMATS}
    phases["no_viewers"] = alone_runs
    report = {
        "benchmark": "serve",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu",
                    "load_average_at_end": os.getloadavg()[0]},
        "config": vars(args) | {"out": args.out.name},  # as the other benchmarks: no machine folders
        "generated_fps_no_viewers": mean(alone_runs, "generated_fps"),
        "ratio_generated_fps_vs_no_viewers": ratios,
        "ratio_generator_busy_fps_vs_no_viewers": busy_ratios,
        "viewers_served_last_round": served,
        # The same question with drift cancelled: the viewers paused and resumed every few seconds;
        # fps with them playing over fps with them paused.
        "ratio_interleaved": {key: round(run["ratio"], 3) for key, run in interleaved.items()},
        "interleaved": interleaved,
        # CPU the viewers cost the serving process (HTTP, pacer, encoders), cores over no viewers, and
        # what the viewer simulator itself used (it shares this machine's cores with the server).
        "serving_cpu_cores_added_by_viewers": cores_added,
        "viewer_simulator_cpu_cores": viewer_cores,
        "cpu_steal_share": round(cpu_steal_share(steal_before, proc_stat_cpu()), 4),
        "phases": phases,
        "connect_disconnect": {"cycles": args.cycles, "seconds": cycles_s},
        "after": {"open_fds": after["open_fds"], "baseline_open_fds": alone_runs[0]["open_fds"],
                  "resident_memory_mb": after["resident_memory_mb"], "clients": after["clients"]},
        "exit_code_after_sigterm": exit_code,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("generated_fps_no_viewers", "ratio_generated_fps_vs_no_viewers",
                                             "ratio_generator_busy_fps_vs_no_viewers", "viewers_served_last_round",
                                             "ratio_interleaved",
                                             "serving_cpu_cores_added_by_viewers", "viewer_simulator_cpu_cores",
                                             "after")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
