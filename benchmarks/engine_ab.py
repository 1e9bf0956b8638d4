"""The rollout engine's cost per block, two skyrt installs measured interleaved (A/B on one machine).

Each round runs, for the baseline install then the candidate (the order reversed every other round,
ABBA, so a machine whose load drifts favours neither):
  * benchmarks/causal_family.py: a preset's stream (tiny shape, latents only), per block median;
  * benchmarks/rollout.py: the kvcache mode's stream (a quick shape, the rollout core's driver only),
    per latent frame (= one block of one frame) without the VAE.
Every script runs from its own install's tree with that install's python, so "before" is the old code
end to end. Reports the median over rounds of each and candidate / baseline (< 1: the candidate is
faster); JSON out.

    python benchmarks/engine_ab.py --baseline-root /tmp/skyrt-main --rounds 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
KV_ARGS = ["--dim", "128", "--layers", "2", "--latent", "16", "--steps", "4", "--frames", "65", "--base-frames", "17",
           "--overlap", "5", "--kv-windows", "4", "--kv-drivers", "core", "--baseline", "skyrt_kvcache_ring_1+4",
           "--skip", "skyrt_window_latent_carry", "skyrt_window_pixel_carry", "diffusers_long_video",
           "diffusers_long_video_async"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-root", type=Path, required=True, help="a checkout of the baseline with its .venv")
    p.add_argument("--candidate-root", type=Path, default=HERE)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--presets", nargs="+", default=["self-forcing", "longlive"])
    p.add_argument("--blocks", type=int, default=16, help="blocks per preset stream (the first is warm-up)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine_ab.json")
    return p.parse_args(argv)


def run_json(root: Path, script: str, args: list[str]) -> dict:
    """Run benchmarks/<script> of the install at `root` with its python; its JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        subprocess.run([str(root / ".venv" / "bin" / "python"), str(root / "benchmarks" / script), *args, "--out",
                        str(out)], cwd=root, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def measure(root: Path, args) -> dict[str, float]:
    """ms per block of every measured stream of one install."""
    out = {}
    for preset in args.presets:
        report = run_json(root, "causal_family.py", ["--shape", "tiny", "--blocks", str(args.blocks), "--no-decode",
                                                      "--preset", preset])
        out[f"preset_{preset}_ms_per_block"] = 1000 * report["result"]["block_s_median"]
    kv = run_json(root, "rollout.py", KV_ARGS)["results"]["skyrt_kvcache_ring_1+4"]
    frames = (65 - 1) // 4 + 1
    out["kvcache_ms_per_block_denoise"] = 1000 * (kv["seconds"] - kv["vae_seconds"]) / frames
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    installs = {"baseline": args.baseline_root.resolve(), "candidate": args.candidate_root.resolve()}
    runs: dict[str, list[dict]] = {name: [] for name in installs}
    for r in range(args.rounds):
        order = list(installs) if r % 2 == 0 else list(installs)[::-1]
        for name in order:
            load = os.getloadavg()[0]
            result = measure(installs[name], args) | {"load_average_before": load}
            print(r, name, json.dumps(result), flush=True)
            runs[name].append(result)
    keys = [k for k in runs["candidate"][0] if k != "load_average_before"]
    median = {name: {k: statistics.median(run[k] for run in runs[name]) for k in keys} for name in installs}
    report = {"benchmark": "engine_ab", "config": {**vars(args), "baseline_root": str(args.baseline_root),
                                                   "candidate_root": "." if args.candidate_root.resolve() == HERE.resolve() else str(args.candidate_root), "out": args.out.name,
                                                   "kvcache_args": KV_ARGS},
              "machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
              "runs": runs, "median": median,
              "candidate_over_baseline": {k: median["candidate"][k] / median["baseline"][k] for k in keys}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["median"], indent=2))
    print(json.dumps(report["candidate_over_baseline"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
