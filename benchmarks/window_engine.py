"""Window mode on the rollout core vs window mode on the host engine it replaced, same run.

The core (skyrt._core.RolloutCore.window, driven by Pipeline._denoise_window: per-block samplers,
CFG and addnoise in C++, the backend's window session step on the core's buffers) against the frozen
host engine (tests/window_numpy_reference.py: one numpy UniPC per frame, the DF matrix,
tests/step_reference.py's predict_velocity per prompt context). Same model, seed, settings and noise;
the runs interleave (core, host, host, core, ...) so a machine whose load drifts slows both alike. Reports ms per DiT
step (schedule row) of each run, the median and fastest of each engine, host / core, and the largest
difference between the two engines' latents; writes JSON.

    python benchmarks/window_engine.py                   # the shipped demo model, its recommended sampling
    python benchmarks/window_engine.py --repeats 2       # quick

Output latents (output="latent", latent carry): no VAE time, only what the engines do.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT = "a red ball rolls across the floor"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the shipped demo model)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    p.add_argument("--frames", type=int, default=61, help="pixel frames of the video")
    p.add_argument("--base-frames", type=int, default=29)
    p.add_argument("--overlap", type=int, default=5)
    p.add_argument("--ar-step", type=int, default=None, help="default: the model's recommendation")
    p.add_argument("--repeats", type=int, default=4, help="runs of each engine (interleaved ABBA)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--machine-note", default="")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "window_engine.json")
    return p.parse_args()


def settings_for(model_dir: Path, args) -> dict:
    from skyrt.runtime.default_model import recommended_sampling

    rec = recommended_sampling(model_dir)
    rec.pop("mode", None)
    for key in ("sink_blocks", "window_blocks"):  # kvcache-only
        rec.pop(key, None)
    if args.ar_step is not None:
        rec["ar_step"] = args.ar_step
    return rec | dict(num_frames=args.frames, base_num_frames=args.base_frames, overlap_history=args.overlap,
                      overlap_carry="latent", output="latent", seed=0)


def total_rows(pipe, settings: dict) -> int:
    """DiT steps of the whole video (every window's schedule rows)."""
    from skyrt.runtime.pipeline import timestep_template, window_rows

    req = pipe._request({**settings, "prompt": PROMPT})
    windows = pipe._plan(req, pipe._condition(req, None, None, None))
    return sum(window_rows(req, w, timestep_template(req)) for w in windows)


def run(pipe, settings: dict, engine: str) -> tuple[float, np.ndarray]:
    from window_numpy_reference import host_engine

    start = time.perf_counter()
    if engine == "core":
        z = pipe.generate(PROMPT, progress=False, **settings)
    else:
        with host_engine(pipe):
            z = pipe.generate(PROMPT, progress=False, **settings)
    return time.perf_counter() - start, z


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import skyrt
    from skyrt.runtime.default_model import default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir()
    extra = {} if args.backend == "torch" else dict(threads=args.threads, progress=False)
    pipe = skyrt.load(model_dir, backend=args.backend, **extra)
    settings = settings_for(model_dir, args)
    rows = total_rows(pipe, settings)
    run(pipe, settings, "core")  # warm-up (and the first-use export of an exported-graph backend), untimed
    run(pipe, settings, "host")
    seconds = {"core": [], "host": []}
    outputs = {}
    for repeat in range(args.repeats):
        order = ("core", "host") if repeat % 2 == 0 else ("host", "core")
        for engine in order:
            load_before = os.getloadavg()[0]
            s, outputs[engine] = run(pipe, settings, engine)
            seconds[engine].append(s)
            print(f"{engine}: {1000 * s / rows:.2f} ms/step (load {load_before:.2f})", flush=True)
    ms = {e: [1000 * s / rows for s in v] for e, v in seconds.items()}
    summary = {e: {"ms_per_step_median": statistics.median(v), "ms_per_step_min": min(v), "ms_per_step_all": v}
               for e, v in ms.items()}
    report = {
        "benchmark": "window_engine",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": args.threads,
                    "cpu_count": os.cpu_count(), "device": "cpu", "note": args.machine_note},
        "model": str(model_dir.name),
        "backend": args.backend,
        "settings": settings,
        "steps_per_video": rows,
        "results": summary,
        "host_over_core_median": summary["host"]["ms_per_step_median"] / summary["core"]["ms_per_step_median"],
        "host_over_core_min": summary["host"]["ms_per_step_min"] / summary["core"]["ms_per_step_min"],
        "max_abs_core_minus_host": float(np.abs(outputs["core"] - outputs["host"]).max()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("results", "host_over_core_median", "host_over_core_min",
                                             "max_abs_core_minus_host")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
