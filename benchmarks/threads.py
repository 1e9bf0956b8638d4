"""`skyrt serve`'s own intra-op thread count against the libraries' defaults, on a busy host.

For 0, 4 and 8 busy background processes (each a pure-Python spin loop, the kind of neighbour a shared
host has), generated frames/s of one `skyrt serve` flat out (output fps above what the model makes):
    before  --threads 0 with OMP_NUM_THREADS unset: torch's default, one intra-op thread per core
    after   no --threads: skyrt's default, usable cores minus the serving process's one
The two run in ABBA order per load level (this machine's speed drifts with its other tenants);
each figure is generated frames over the measured seconds after the first-chunk warm-up.

    flock HEAVY_LOCK nice -n 5 python benchmarks/threads.py            # built-in model, 32x32, 2 steps
    python benchmarks/threads.py --busy 0,4 --seconds 8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve as serve_benchmark  # noqa: E402  (benchmarks/serve.py: start a server, measure it)

SPIN = "while True: pass"
MODES = {"before": ["--threads", "0"], "after": []}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the built-in default model)")
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--pacer-fps", type=int, default=120, help="output fps, above what the model generates")
    p.add_argument("--busy", default="0,4,8", help="busy background processes per level")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per server")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "threads.json")
    return p.parse_args()


def start_busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(timeout=10)


def server_rate(args, mode: str) -> dict:
    """One fresh server in `mode`: its generated fps and the threads its generator child reported."""
    serve_args = argparse.Namespace(pacer_fps=args.pacer_fps, height=args.height, width=args.width,
                                    steps=args.steps, model=args.model, seconds=args.seconds,
                                    extra=" ".join(["--formats", "mjpeg", *MODES[mode]]))
    proc, base = serve_benchmark.start_server(serve_args)
    try:
        threads = serve_benchmark.get_json(base + "/status")["generator_process"]["threads"]
        time.sleep(3.0)  # past the first chunks
        measured = serve_benchmark.measure_alone(base, proc.pid, args.seconds)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"generated_fps": round(measured["generated_fps"], 2), "generator_threads": threads}


def main() -> None:
    args = parse_args()
    os.environ.pop("OMP_NUM_THREADS", None)  # "before" means nothing set anywhere
    os.environ.pop("MKL_NUM_THREADS", None)
    levels = [int(x) for x in args.busy.split(",")]
    results = []
    for busy in levels:
        background = start_busy(busy)
        try:
            time.sleep(1.0)
            runs = {mode: [] for mode in MODES}
            for mode in ("before", "after", "after", "before"):  # ABBA
                runs[mode].append(server_rate(args, mode))
        finally:
            stop_busy(background)
        fps = {mode: [r["generated_fps"] for r in rs] for mode, rs in runs.items()}
        mean = {mode: sum(v) / len(v) for mode, v in fps.items()}
        entry = {"busy_processes": busy, "fps": fps, "mean_fps": {m: round(v, 2) for m, v in mean.items()},
                 "after_over_before": round(mean["after"] / mean["before"], 2) if mean["before"] else None,
                 "generator_threads": {mode: rs[0]["generator_threads"] for mode, rs in runs.items()}}
        print(json.dumps(entry), flush=True)
        results.append(entry)
    report = {"benchmark": "threads", "machine": f"{platform.processor() or platform.machine()}, "
                                                  f"{os.cpu_count()} cores, no GPU",
              "usable_cores": len(os.sched_getaffinity(0)),
              "settings": {"model": args.model or "built-in", "height": args.height, "width": args.width,
                           "steps": args.steps, "seconds": args.seconds, "pacer_fps": args.pacer_fps},
              "modes": {"before": "--threads 0, OMP_NUM_THREADS unset (torch's default)",
                        "after": "no --threads (skyrt's default: usable cores - 1)"},
              "levels": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
