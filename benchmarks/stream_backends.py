"""Which CPU backend streams the default model fastest: torch vs onnxruntime, whole streams.

Opens the same endless stream (the model's recommended settings, what `skyrt serve` runs) on each
backend and times generated frames: text encoding, every DiT step and the streaming VAE decode.
Backends alternate in rounds (a stream of --chunks chunks on A, then on B, ...) so machine noise
hits all alike; the median frames/s per backend and the ratio onnxruntime / torch are written.
onnxruntime's first use exports its graphs into the cache: that happens in an untimed warm-up
round, and its time is reported separately.

    python benchmarks/stream_backends.py                 # the built-in demo model
    python benchmarks/stream_backends.py --model DIR --rounds 3 --chunks 20
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the built-in demo model)")
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"], choices=["torch", "onnxruntime"])
    p.add_argument("--chunks", type=int, default=30, help="chunks (blocks) per timed stream")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stream_backends.json")
    return p.parse_args(argv)


def open_stream(pipe, settings: dict, chunks: int, seed: int):
    return pipe.stream("a red circle bouncing on a dark blue background, camera panning left", seed=seed,
                       max_chunks=chunks, **settings)


def timed_stream(pipe, settings: dict, chunks: int, seed: int) -> float:
    """Generated frames per second of one stream of `chunks` chunks, from opening it to the last frame."""
    t0 = time.perf_counter()
    frames = sum(len(chunk) for chunk in open_stream(pipe, settings, chunks, seed))
    return frames / (time.perf_counter() - t0)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import skyrt
    from skyrt.runtime.default_model import default_model_dir, recommended_sampling

    torch.set_num_threads(args.threads)
    model_dir = args.model or default_model_dir()
    settings = recommended_sampling(model_dir) or {"mode": "kvcache", "num_inference_steps": 4, "shift": 2.0,
                                                   "guidance_scale": 1.0, "ar_step": 4, "causal_block_size": 1,
                                                   "height": 128, "width": 128}
    pipes, warmup = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name in args.backends:
            options = {"threads": args.threads} if name == "onnxruntime" else {}
            t0 = time.perf_counter()
            pipes[name] = skyrt.load(model_dir, backend=name, **options)
            for _ in open_stream(pipes[name], settings, 2, seed=0):  # exports (ORT) and warms up
                pass
            warmup[name] = time.perf_counter() - t0
            print(f"{name}: loaded and warmed up in {warmup[name]:.1f} s", flush=True)
        fps = {name: [] for name in args.backends}
        for r in range(args.rounds):
            for name in args.backends:
                fps[name].append(timed_stream(pipes[name], settings, args.chunks, seed=r))
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f} fps" for n, v in fps.items()), flush=True)
    medians = {name: statistics.median(v) for name, v in fps.items()}
    report = {"benchmark": "stream_backends", "model": model_dir.name, "settings": settings,
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "device": "cpu",
                          "threads": args.threads},
              "chunks_per_stream": args.chunks, "rounds": args.rounds, "load_and_warmup_s": warmup,
              "generated_fps": fps, "median_fps": medians}
    if {"torch", "onnxruntime"} <= set(medians):
        report["onnxruntime_over_torch"] = medians["onnxruntime"] / medians["torch"]
        print(f"onnxruntime / torch: {report['onnxruntime_over_torch']:.2f}x")
    report["fastest"] = max(medians, key=medians.get)
    print("median generated fps: " + ", ".join(f"{n} {v:.1f}" for n, v in medians.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
