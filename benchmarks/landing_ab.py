"""This checkout against a previous landing, in one run: benchmarks/rollout.py and benchmarks/serve.py
for both, interleaved (ABBA per round), medians and ratios (current / baseline; > 1: current is faster).

The baseline commit is checked out into a temporary git worktree and installed, with its own compiled
extension (csrc -> skyrt._core), into a temporary virtual environment that borrows this environment's
third-party packages (torch, diffusers, aiohttp, ...) but not its skyrt. Each side runs its own copy of
the benchmark scripts with its own interpreter, so what differs is the runtime and its core, not the
harness. Writes benchmarks/results/landing_ab.json (no machine paths: the baseline is named by commit).

    python benchmarks/landing_ab.py                                # baseline 9b49636, short settings
    python benchmarks/landing_ab.py --baseline-commit abc1234 --rounds 3
    python benchmarks/landing_ab.py --prepare-only --work-dir /tmp/ab   # build the baseline once, keep it
    python benchmarks/landing_ab.py --work-dir /tmp/ab             # ... and reuse that build

The settings are short on purpose (a 2-core CPU, ~10 minutes in all): rollout.py on a small random
model, skyrt's kvcache ring and window mode only (diffusers and the numpy driver measure neither
install); serve.py's no-viewer generated frames/s of a fresh `skyrt serve` on the built-in model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "9b49636"  # the landing before issue 33 (one rollout engine, one request)
# rollout.py: what each side measures (small model; kvcache ring 1+4 and window mode with latent carry).
ROLLOUT_ARGS = ["--dim", "128", "--layers", "2", "--latent", "8", "--steps", "4", "--frames", "33",
                "--base-frames", "17", "--overlap", "5", "--kv-windows", "4", "--kv-drivers", "core", "--kv-repeats", "2",
                "--skip", "skyrt_window_pixel_carry", "diffusers_long_video", "diffusers_long_video_async",
                "--baseline", "skyrt_kvcache_ring_1+4"]
ROLLOUT_FIGURES = ("latent_frames_per_s", "denoise_latent_frames_per_s", "time_to_first_frame_s")
# serve.py: generated frames/s with no viewers of a fresh `skyrt serve` (built-in model), one server per measurement.
SERVE_ARGS = ["--height", "64", "--width", "64", "--steps", "2", "--seconds", "15"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-commit", default=DEFAULT_BASELINE, help="the previous landing (any git revision)")
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each runs both sides twice)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the baseline's worktree and environment live (default: a temporary folder, removed "
                        "at the end); an existing one built for the same commit is reused")
    p.add_argument("--prepare-only", action="store_true", help="build the baseline in --work-dir and stop")
    p.add_argument("--skip", nargs="*", default=[], choices=["rollout", "serve"], help="benchmarks to leave out")
    p.add_argument("--machine-note", default="", help="free text stored with the machine")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "landing_ab.json")
    return p.parse_args()


# ------------------------------------------------------------------------------------ the baseline install
def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def prepare_baseline(commit: str, work: Path) -> tuple[Path, Path, float]:
    """(worktree, python, build seconds) of `commit` installed into a venv under `work`. The venv sees this
    environment's site-packages through a .pth line (a plain path: the .pth files in it, this checkout's
    editable skyrt among them, are not run), after its own, where the baseline's skyrt is installed."""
    full = git("rev-parse", commit)
    tree, venv = work / "tree", work / "venv"
    python = venv / "bin" / "python"
    marker = work / "built-commit"
    if marker.exists() and marker.read_text() == full and python.exists():
        return tree, python, 0.0
    if tree.exists():
        git("worktree", "remove", "--force", str(tree))
    work.mkdir(parents=True, exist_ok=True)
    git("worktree", "add", "--detach", str(tree), full)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "borrowed_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", str(tree)], check=True)
    seconds = time.monotonic() - started
    check = subprocess.run([str(python), "-c", "import skyrt, skyrt._core, skyrt.runtime; print(skyrt.__file__)"],
                           check=True, capture_output=True, text=True, cwd=work).stdout.strip()
    if str(work) not in check:
        raise SystemExit(f"the baseline environment imports skyrt from {check}, not its own install")
    marker.write_text(full)
    return tree, python, seconds


def remove_baseline(work: Path) -> None:
    tree = work / "tree"
    if tree.exists():
        git("worktree", "remove", "--force", str(tree))
    shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------ one measurement each
def run_rollout(tree: Path, python: Path, out: Path) -> dict:
    """One rollout.py run of the side in `tree`: {result name: {figure: value}}."""
    subprocess.run([str(python), str(tree / "benchmarks" / "rollout.py"), *ROLLOUT_ARGS, "--out", str(out)],
                   check=True, cwd=out.parent, stdout=subprocess.DEVNULL, env=_env())
    results = json.loads(out.read_text())["results"]
    return {name: {k: r[k] for k in ROLLOUT_FIGURES} for name, r in results.items()}


def run_serve(python: Path) -> float:
    """Generated frames/s of one fresh `skyrt serve` started by `python` (that side's install), no viewers:
    serve.py's own measurement (fresh_server_rate: past the first chunk, then SERVE_ARGS' seconds). The
    harness is this checkout's for both sides (serve.py is unchanged since the baseline); the server is each side's."""
    return _serve_harness().fresh_server_rate(_serve_options(), str(python))["generated_fps"]


def _serve_harness():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import serve
    finally:
        sys.path.pop(0)
    return serve


def _serve_options() -> argparse.Namespace:
    harness = _serve_harness()
    argv, sys.argv = sys.argv, ["serve.py", *SERVE_ARGS]
    try:
        return harness.parse_args()
    finally:
        sys.argv = argv


def _env() -> dict:
    # One thread per library, as everywhere on this machine; no PYTHONPATH that could mix the two installs.
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1",
                                                                           "MKL_NUM_THREADS": "1"}


def main() -> None:
    args = parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="skyrt-landing-ab-"))
    try:
        base_tree, base_python, build_s = prepare_baseline(args.baseline_commit, work)
        if args.prepare_only:
            print(f"baseline {args.baseline_commit} built in {build_s:.0f} s")
            return
        sides = {"current": (ROOT, Path(sys.executable)), "baseline": (base_tree, base_python)}
        rollout: dict[str, list] = {"current": [], "baseline": []}
        serve: dict[str, list] = {"current": [], "baseline": []}
        scratch = work / "results"
        scratch.mkdir(exist_ok=True)
        started = time.monotonic()
        for round_ in range(args.rounds):
            order = ("current", "baseline", "baseline", "current") if round_ % 2 == 0 else (
                "baseline", "current", "current", "baseline")
            for label in order:
                tree, python = sides[label]
                if "rollout" not in args.skip:
                    rollout[label].append(run_rollout(tree, python, scratch / f"rollout_{label}.json"))
                if "serve" not in args.skip:
                    serve[label].append(run_serve(python))
                print(f"round {round_ + 1} {label}: " + json.dumps(
                    {"rollout": rollout[label][-1:] and rollout[label][-1], "serve_fps": serve[label][-1:]}), flush=True)
        write_report(args, rollout, serve, build_s, time.monotonic() - started)
    finally:
        if args.work_dir is None:
            remove_baseline(work)


def medians(runs: list[dict]) -> dict:
    """Per result name and figure, the median over runs."""
    return {name: {k: statistics.median(run[name][k] for run in runs) for k in ROLLOUT_FIGURES} for name in runs[0]}


def write_report(args, rollout: dict, serve: dict, build_s: float, seconds: float) -> None:
    report = {
        "benchmark": "landing_ab",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "device": "cpu", "load_average_at_end": os.getloadavg()[0], "note": args.machine_note},
        "current": git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain",
                                                                                              "--untracked-files=no")
                                                          else ""),
        "baseline": git("rev-parse", "--short", args.baseline_commit),
        "config": {"rounds": args.rounds, "order": "ABBA per round", "rollout_args": ROLLOUT_ARGS,
                   "serve_args": SERVE_ARGS, "baseline_build_seconds": round(build_s, 1),
                   "measured_seconds": round(seconds, 1)},
    }
    if rollout["current"]:
        med = {label: medians(runs) for label, runs in rollout.items()}
        report["rollout"] = {
            "median": med,
            # > 1: current is faster (time to first frame: baseline's over current's).
            "ratio_current_vs_baseline": {
                name: {"latent_frames_per_s": cur["latent_frames_per_s"] / med["baseline"][name]["latent_frames_per_s"],
                       "denoise_latent_frames_per_s": cur["denoise_latent_frames_per_s"]
                       / med["baseline"][name]["denoise_latent_frames_per_s"],
                       "time_to_first_frame": med["baseline"][name]["time_to_first_frame_s"]
                       / cur["time_to_first_frame_s"]}
                for name, cur in med["current"].items() if name in med["baseline"]},
            "runs": rollout,
        }
    if serve["current"]:
        fps = {label: statistics.median(runs) for label, runs in serve.items()}
        report["serve"] = {"median_generated_fps": fps,
                           "ratio_current_vs_baseline": fps["current"] / fps["baseline"], "runs": serve}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k]["ratio_current_vs_baseline"] for k in ("rollout", "serve") if k in report},
                     indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
