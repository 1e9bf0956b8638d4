"""`skyrt serve` of a causal-family preset: torch backend vs its ONNX export on onnxruntime with torch blocked.

Writes a random-weight model folder in the preset's layout (benchmarks/causal_family.py), exports it
with export/preset_export.py (`skyrt export onnx --preset`), then serves each in turn, interleaved
(torch, onnxruntime, torch, onnxruntime, ...), as real `skyrt serve` processes on loopback: the
onnxruntime server runs with `import torch` made to fail (a shadow package first on PYTHONPATH, in the
server and its generator child), so a torch import anywhere on its path would crash it. Each run waits
for the warm-up blocks, then reads the generator's frames between two /status snapshots taken at
chunk boundaries (frames_generated over last_chunk_at_s: exact, frames arrive a block at a time).
The pacer's --fps is set above what the generator reaches, so the generator is never throttled.

    python benchmarks/preset_serve.py --preset self-forcing --shape tiny --rounds 3 --seconds 20

JSON out (benchmarks/results/preset_serve.json): generated frames/s per run and backend, medians, the
ratio onnxruntime / torch, the machine. Random weights: only the speed means anything.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from serving import free_port, stop_process  # noqa: E402  (the tests' server helpers)

BLOCK_TORCH = 'raise ImportError("torch is blocked: the exported-graph serving path must not import it")\n'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="self-forcing")
    p.add_argument("--shape", choices=("tiny",), default="tiny", help="the model shape (causal_family.py SHAPES)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs per backend")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run (after warm-up)")
    p.add_argument("--warmup-frames", type=int, default=30, help="frames generated before measuring")
    p.add_argument("--threads", type=int, default=2, help="OMP / onnxruntime intra-op threads")
    p.add_argument("--out", type=Path, default=HERE / "results" / "preset_serve.json")
    return p.parse_args(argv)


def torch_blocked_env(root: Path) -> dict:
    """os.environ with torch, transformers and diffusers made unimportable (shadow packages)."""
    shadow = root / "no_torch"
    for name in ("torch", "transformers", "diffusers"):
        (shadow / name).mkdir(parents=True, exist_ok=True)
        (shadow / name / "__init__.py").write_text(BLOCK_TORCH)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shadow), env.get("PYTHONPATH", "")) if p)
    return env


def status(base: str) -> dict:
    with urllib.request.urlopen(base + "/status", timeout=5) as r:
        return json.loads(r.read())


def wait_for(base: str, proc, predicate, timeout: float, log: Path) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"skyrt serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            s = status(base)
            if predicate(s):
                return s
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for the server:\n{log.read_text()[-3000:]}")


def serve_once(model: Path, backend: str, sampling: list[str], env: dict, args, workdir: Path) -> dict:
    """One `skyrt serve` run: generated frames/s between two chunk-boundary snapshots after warm-up."""
    port = free_port()
    log = workdir / f"serve-{backend}-{port}.log"
    cmd = [sys.executable, "-m", "skyrt.runtime.cli", "serve", "--model", str(model), "--backend", backend,
           "--port", str(port), "--no-token", "--fps", "120", *sampling]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        first = wait_for(base, proc, lambda s: s["frames_generated"] >= args.warmup_frames, 600, log)
        ready_s = time.monotonic() - start
        time.sleep(args.seconds)
        last = wait_for(base, proc, lambda s: s["last_chunk_at_s"] != first["last_chunk_at_s"], 120, log)
        frames = last["frames_generated"] - first["frames_generated"]
        span = last["last_chunk_at_s"] - first["last_chunk_at_s"]
        text = log.read_text()
        return {"backend": backend, "generated_fps": frames / span, "frames": frames, "span_s": span,
                "ready_s": ready_s, "time_to_first_frame_s": last.get("time_to_first_frame_s"),
                "import_error_in_log": "ImportError" in text}
    finally:
        stop_process(proc)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    import torch

    from causal_family import SHAPES, write_random_folder
    from skyrt.export.preset_export import export_preset_onnx
    from skyrt.runtime.causal_family import get_preset

    preset = get_preset(args.preset)
    h, w = SHAPES[args.shape]["latent"]
    height, width = 8 * h, 8 * w
    if preset.lora_names:  # causal_family.py writes a rank-4 LoRA; `skyrt serve` has no --lora-alpha
        raise SystemExit(f"--preset {args.preset}: pick a preset without a LoRA (self-forcing, causvid, ...)")
    lora: dict = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = write_random_folder(root / "model", args.preset, args.shape, torch.float32)
        start = time.perf_counter()
        export_preset_onnx(folder, root / "export", args.preset, height=height, width=width, progress=False, **lora)
        export_s = time.perf_counter() - start
        sampling = ["--preset", args.preset, "--height", str(height), "--width", str(width)]
        sources = {"torch": (folder, env), "onnxruntime": (root / "export", torch_blocked_env(root) | {
            "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})}
        for round_ in range(args.rounds):
            for backend, (model, run_env) in sources.items():
                result = serve_once(model, backend, sampling, run_env, args, root)
                result["round"] = round_
                print(json.dumps(result))
                runs.append(result)
    medians = {b: float(np.median([r["generated_fps"] for r in runs if r["backend"] == b])) for b in sources}
    report = {
        "benchmark": "preset_serve",
        "config": {**vars(args), "out": args.out.name, "height": height, "width": width,
                   "ring": {"sink_blocks": preset.ring.sink_blocks, "window_blocks": preset.ring.window_blocks}},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or "cpu",
                    "cpus": os.cpu_count(), "note": "shared 2-core CPU machine, other jobs running"},
        "export_s": export_s,
        "runs": runs,
        "result": {"generated_fps_median": medians,
                   "onnxruntime_over_torch": medians["onnxruntime"] / medians["torch"],
                   "onnxruntime_torch_blocked": True,
                   "onnxruntime_import_errors": any(r["import_error_in_log"] for r in runs
                                                    if r["backend"] == "onnxruntime")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["result"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
