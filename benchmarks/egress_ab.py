"""Serving cost per viewer before / after the output registry: CPU µs per frame delivered, per output.

"Before" is the server as it was before the output registry and the removal of the hand-written
HLS fast path (by default commit 9b49636, the parent of the first commit of that work: the fast
path in runtime/server/connections.py answered HLS below aiohttp and pushers wrote stream clients
from the publish callback). "After" is this checkout. Both run in the same run, one after the
other in ABBA order over `--rounds`, with the same model (built-in default), size, fps and viewers.

The baseline's source is taken with `git archive COMMIT` into `--work-dir` and its extension
(skyrt._core, CPU references only: the serving path does not touch CUDA) is built there with
CMake, since its bindings differ from this checkout's; an overlay package (skyrt/ with the
baseline's runtime/ and export/ and its own _core) is put first on PYTHONPATH, with a
sitecustomize that drops this venv's editable-install finder so the baseline's modules are the
ones imported, in the server and in its spawned generator child. A later run reuses the build.

Per server: no viewers, then `--viewers` MJPEG, fMP4, HLS (benchmarks/viewers.py) and, after only,
WebRTC (benchmarks/whep_viewers.py) viewers, each for `--seconds`, then no viewers again. CPU is the
serving process's own (the generator child excluded); the cost of a phase is its CPU over the mean
of the two no-viewer phases, divided by the frames its viewers received (egress.viewer_phase: MJPEG
parts; fMP4 fragments (one a frame); HLS viewers x fps x seconds, each viewer fetching every segment once; WebRTC frames decoded).
LL-HLS did not exist before (its viewer load is not simulated here).

    flock LOCK python benchmarks/egress_ab.py --rounds 2 --seconds 12 --also main=COMMIT --out benchmarks/results/egress_ab.json

`--also LABEL=COMMIT` adds another commit's server to every round (forward order, then reversed), with
every output of this checkout; a commit whose extension sources equal this checkout's reuses its build.
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
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).parent))
import egress  # noqa: E402  (its viewer phases and process figures)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BASELINE_COMMIT = "9b49636"  # main before issue 35's work (its first commit is 32d929f, the fast path went in 0d12433)
SITECUSTOMIZE = '''"""Imported by site after the .pth files: drop the editable install's finder, so the overlay's
skyrt (first on PYTHONPATH) is the one imported."""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
'''


# ------------------------------------------------------------------------------ the baseline install
def run_logged(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with open(log, "a") as out:
        if subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed; see {log}")


BUILD_INPUTS = ("csrc", "CMakeLists.txt", "python", "pyproject.toml")  # what the extension is built from


def same_extension_as_checkout(commit: str) -> Path | None:
    """This venv's built skyrt._core when `commit` builds the same extension as this checkout
    (no difference in its build inputs): no second build is needed then."""
    same = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", commit, "HEAD", "--", *BUILD_INPUTS]).returncode == 0
    if not same:
        return None
    code = "import skyrt._core as c; print(c.__file__)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir())
    return Path(found.stdout.strip()) if found.returncode == 0 and found.stdout.strip() else None


def prepare_baseline(commit: str, work: Path) -> dict:
    """The environment that runs `commit`'s server: its tree and build under `work` (made once)."""
    tree, build, pkg = work / "tree", work / "build", work / "pkg"
    log = work / "build.log"
    if not (tree / "runtime").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    built = sorted(build.glob("_core*.so"))
    if not built and (reused := same_extension_as_checkout(commit)) is not None:
        built = [reused]
    if not built:
        run_logged(["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DSKYRT_CUDA=OFF",
                    f"-DPython_EXECUTABLE={sys.executable}"], log)
        run_logged(["cmake", "--build", str(build), "-j", "2"], log)
        built = sorted(build.glob("_core*.so"))
        if not built:
            raise SystemExit(f"the baseline's extension was not built; see {log}")
    package = pkg / "skyrt"
    if not package.is_dir():
        package.mkdir(parents=True)
        shutil.copy(tree / "python" / "skyrt" / "__init__.py", package / "__init__.py")
        for name in ("runtime", "export"):
            (package / name).symlink_to(tree / name)
        (package / built[0].name).symlink_to(built[0])
        (pkg / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": str(pkg)}


def imported_from(env: dict) -> str:
    """Where `skyrt.runtime.server` is imported from under `env` (checked before measuring)."""
    code = "import skyrt.runtime.server as s, skyrt._core as c; print(s.__file__, c.__file__)"
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), check=True,
                          capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout.strip()


# ------------------------------------------------------------------------------ one server, its phases
def start_server(args, formats: str, env: dict, log) -> tuple[subprocess.Popen, str]:
    port = egress.free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "skyrt.runtime.cli", "serve", "--port", str(port), "--no-token", "--fps",
           str(args.fps), "--height", str(args.size), "--width", str(args.size), "--formats", formats,
           "--max-connections-per-address", "1000"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, **env), stdout=log, stderr=subprocess.STDOUT,
                            cwd=tempfile.gettempdir())
    deadline = time.monotonic() + 300
    while True:
        try:
            if egress.get_json(base + "/status")["frames_output"] > 0:
                return proc, base
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"the server ({' '.join(cmd)}) never produced a frame; see {log.name}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def alone_phase(base: str, pid: int, seconds: float) -> dict:
    before = egress.snapshot(base, pid)
    time.sleep(seconds)
    return egress.between(before, egress.snapshot(base, pid))


def measure_server(args, side: str, env: dict, outputs: tuple[str, ...], log) -> dict:
    """No viewers, each output's viewers, no viewers again: µs per frame delivered per output."""
    formats = ",".join(outputs)  # the same encoders on both sides, webrtc (after only) following mp4's encode
    proc, base = start_server(args, formats, env, log)
    try:
        time.sleep(2.0)  # past the first segments
        first = alone_phase(base, proc.pid, args.seconds)
        phases = {}
        for kind in outputs:
            phases[kind] = egress.viewer_phase(base, proc.pid, kind, args.viewers, args.seconds, args.fps)
            time.sleep(2.0)
        last = alone_phase(base, proc.pid, args.seconds)
    finally:
        stop_server(proc)
    idle_cores = (first["serving_cpu_cores"] + last["serving_cpu_cores"]) / 2
    figures = {}
    for kind, phase in phases.items():
        extra = phase["serving_cpu_cores"] - idle_cores
        delivered_per_s = phase["frames_delivered_in_window"] / phase["seconds"]
        figures[kind] = {
            "us_per_frame_delivered": round(extra / delivered_per_s * 1e6, 1) if delivered_per_s else None,
            "cores_per_viewer": round(extra / args.viewers, 5), "frames_delivered": phase["frames_delivered_in_window"],
            "generated_fps": round(phase["generated_fps"], 2), "viewer_errors": phase["viewer_report"].get("errors"),
        }
    print(side, {k: v["us_per_frame_delivered"] for k, v in figures.items()}, f"idle {idle_cores:.4f} cores",
          flush=True)
    return {"idle_serving_cores": [round(first["serving_cpu_cores"], 5), round(last["serving_cpu_cores"], 5)],
            "outputs": figures}


def summarize(rounds: list[dict], outputs_after: tuple[str, ...], sides: tuple[str, ...]) -> dict:
    """Median µs / frame per side and output over the rounds, and after / each other side."""
    summary = {}
    for kind in outputs_after:
        row = {}
        for side in sides:
            values = [r[side]["outputs"][kind]["us_per_frame_delivered"] for r in rounds
                      if kind in r[side]["outputs"] and r[side]["outputs"][kind]["us_per_frame_delivered"] is not None]
            row[f"{side}_us_per_frame"] = round(median(values), 1) if values else None
            row[f"{side}_per_round"] = values
        for side in sides:
            if side != "after" and row[f"{side}_us_per_frame"] and row["after_us_per_frame"]:
                row[f"after_over_{side}"] = round(row["after_us_per_frame"] / row[f"{side}_us_per_frame"], 2)
        summary[kind] = row
    return summary


def parse_also(values: list[str]) -> dict[str, str]:
    """`--also LABEL=COMMIT` pairs: more servers measured in the same run (e.g. main=5a7034e)."""
    pairs = {}
    for value in values:
        label, sep, commit = value.partition("=")
        if not sep or not label.isidentifier() or not commit or label in ("before", "after"):
            raise SystemExit(f"--also {value!r}: write LABEL=COMMIT, e.g. --also main=5a7034e "
                             f"(a label other than 'before' and 'after')")
        pairs[label] = commit
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "skyrt-egress-ab",
                   help="where the baseline's tree and build live (kept: a later run reuses them)")
    p.add_argument("--seconds", type=float, default=12.0, help="per measured phase")
    p.add_argument("--viewers", type=int, default=20)
    p.add_argument("--fps", type=int, default=12)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="rounds of two servers, ABBA order")
    p.add_argument("--also", action="append", default=[], metavar="LABEL=COMMIT",
                   help="another commit measured in the same run with every output of this checkout "
                        "(e.g. main=5a7034e); repeatable")
    p.add_argument("--out", type=Path, default=HERE / "results" / "egress_ab.json")
    args = p.parse_args()

    after_outputs = ("mjpeg", "mp4", "hls", "webrtc")
    commits = {"before": args.baseline_commit, **parse_also(args.also)}
    sides, works = {}, {}
    for label, commit in commits.items():
        works[label] = work = args.work_dir / commit
        work.mkdir(parents=True, exist_ok=True)
        sides[label] = (prepare_baseline(commit, work), ("mjpeg", "mp4", "hls") if label == "before" else after_outputs)
    sides["after"] = ({}, after_outputs)
    where = {side: imported_from(env) for side, (env, _outputs) in sides.items()}
    for label, work in works.items():
        if where[label] == where["after"] or str(work) not in where[label]:
            raise SystemExit(f"{label} ({commits[label]}) does not import from its own tree: {where}")
    load_at_start = round(os.getloadavg()[0], 2)
    log = tempfile.NamedTemporaryFile(prefix="egress-ab-serve-", suffix=".log", delete=False)
    rounds = []
    forward = tuple(sides)  # before, the --also commits, after; every other round in reverse (ABBA)
    for r in range(args.rounds):
        order = forward if r % 2 == 0 else forward[::-1]
        rounds.append({side: measure_server(args, side, sides[side][0], sides[side][1], log) for side in order})
    log.close()
    Path(log.name).unlink(missing_ok=True)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    result = {
        "benchmark": "egress_ab",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m_at_start": load_at_start,
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                    "cpu_tick_s": round(1 / os.sysconf("SC_CLK_TCK"), 4)},  # the resolution of the CPU figures
        "before": {"commit": args.baseline_commit, "what": "fast path (HLS answered below aiohttp), pushers"},
        **{label: {"commit": commit, "what": "--also"} for label, commit in commits.items() if label != "before"},
        "after": {"commit": head, "what": "this checkout"},
        "settings": {"size": args.size, "fps": args.fps, "seconds_per_phase": args.seconds, "viewers": args.viewers,
                     "rounds": args.rounds, "model": "built-in default"},
        "order": [list(r) for r in rounds],
        "us_per_frame_delivered": summarize(rounds, after_outputs, forward),
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["us_per_frame_delivered"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
