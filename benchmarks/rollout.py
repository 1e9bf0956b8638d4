"""Rollout throughput: skyrt kvcache and window modes vs diffusers' SkyReelsV2DiffusionForcingPipeline.

Same random mid-size model (weights shared through the diffusers layout), same CPU, same settings,
one run each, measured back to back so the ratio is meaningful on a noisy machine. Reports latent
frames per second, the same without VAE time ("denoise only"), and time to first decoded frame;
writes JSON.

    python benchmarks/rollout.py                      # default: the official long-video settings
    python benchmarks/rollout.py --dim 128 --layers 2 --latent 16 --steps 4 --frames 33 --base-frames 17 \
        --overlap 5 --kv-windows 2                    # quick

diffusers and skyrt's window mode run the official long-video recipe (README of SkyReels-V2:
97-frame windows, 17-frame overlap, synchronous); skyrt's kvcache mode streams the same number of
latent frames, one block of one latent frame at a time, against a ring of 1 sink block plus each
--kv-windows size (1 + 4 holds the 17 frames of history the official recipe carries between windows).

Each kvcache run is made twice, back to back (--kv-drivers): by the runtime (its state in the C++
rollout core, skyrt._core.RolloutCore, the backend's step on the core's buffers) and by the all-numpy
driver the core replaced (tests/kvcache_numpy_reference.py: numpy UniPC per frame, host caches, the
per-call kv_step of tests/step_reference.py), so "core_vs_numpy_reference" in the JSON says whether the
core is slower than what it replaced, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256, help="DiT width (heads of 128 ... here heads = dim / 64)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--latent", type=int, default=32, help="latent height = width (pixels = 8x)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frames", type=int, default=257, help="pixel frames of the long video")
    p.add_argument("--base-frames", type=int, default=97)
    p.add_argument("--overlap", type=int, default=17)
    p.add_argument("--guidance-scale", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-ar-step", type=int, default=None,
                   help="ar_step of the kvcache stream (default: --steps, one block in flight at a time)")
    p.add_argument("--kv-sink-blocks", type=int, default=1)
    p.add_argument("--kv-windows", type=int, nargs="+", default=[4, 8], help="ring window sizes to measure")
    p.add_argument("--kv-backends", nargs="+", default=["torch"], choices=["torch", "onnxruntime"],
                   help="backends of the kvcache runs (onnxruntime: CPU graphs, exported in an untimed warm-up)")
    p.add_argument("--kv-drivers", nargs="+", default=["core", "numpy_reference"], choices=["core", "numpy_reference"],
                   help="who drives the kvcache runs: the rollout core, and/or the numpy rollout it replaced")
    p.add_argument("--kv-repeats", type=int, default=1,
                   help="runs of each kvcache stream, the drivers' order reversed on every other repeat (ABBA); "
                        "the fastest run is reported, all durations are kept in seconds_all")
    p.add_argument("--skip", nargs="*", default=[], help="result names to leave out (e.g. skyrt_window_pixel_carry)")
    p.add_argument("--baseline", default="diffusers_long_video", help="the result the ratios divide by")
    p.add_argument("--machine-note", default="", help="free text stored with the machine (e.g. shared with other jobs)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rollout.json")
    return p.parse_args()


class Clock:
    """Notes when the first decoded frame exists and how long the VAE ran (decode and encode)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self.vae_s = 0.0

    def wrap_decode(self, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.vae_s += time.perf_counter() - t0
            if self.first is None:
                self.first = time.perf_counter() - self.start
            return out
        return timed

    def wrap_encode(self, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.vae_s += time.perf_counter() - t0
            return out
        return timed

    def result(self, frames: int) -> dict:
        total = time.perf_counter() - self.start
        return {"seconds": total, "vae_seconds": self.vae_s, "time_to_first_frame_s": self.first,
                "pixel_frames": frames}


def run_skyrt(model_dir, args, settings, carry: str) -> dict:
    import skyrt

    pipe = skyrt.load(model_dir)
    clock = Clock()
    pipe.backend.vae_decode = clock.wrap_decode(pipe.backend.vae_decode)
    pipe.backend.vae_encode = clock.wrap_encode(pipe.backend.vae_encode)
    clock.start = time.perf_counter()
    frames = pipe.generate("a red circle", negative_prompt="", overlap_carry=carry, progress=False, seed=0,
                           **settings)
    return clock.result(len(frames))


def run_skyrt_kvcache(model_dir, args, settings, window_blocks: int, backend: str = "torch",
                      driver: str = "core") -> dict:
    """mode="kvcache" stream: blocks of one latent frame, a ring of --kv-sink-blocks + window_blocks;
    the same number of latent frames as the long video. Also reports the steady rate once the ring is full.
    backend="onnxruntime" exports its graphs (into a cache beside the model) in an untimed warm-up.
    driver="numpy_reference": the stream driven by the numpy rollout the core replaced."""
    if driver == "numpy_reference":
        from skyrt.runtime import kvcache

        saved = kvcache.KVRollout
        kvcache.KVRollout = _numpy_reference_rollout()  # Pipeline._kv_rollout reads it from the module
        try:
            return run_skyrt_kvcache(model_dir, args, settings, window_blocks, backend)
        finally:
            kvcache.KVRollout = saved
    import warnings

    import skyrt

    if backend == "torch":
        pipe = skyrt.load(model_dir)
    else:
        pipe = skyrt.load(model_dir, backend=backend, threads=args.threads, cache_dir=Path(model_dir).parent / "cache",
                          progress=False)
        _warm_up_exports(pipe, args, settings, window_blocks)
    clock = Clock()
    real_decoder = pipe.backend.streaming_decoder

    def timed_decoder():
        decoder = real_decoder()
        decoder.decode_next = clock.wrap_decode(decoder.decode_next)
        return decoder

    pipe.backend.streaming_decoder = timed_decoder
    latent_frames = (settings["num_frames"] - 1) // 4 + 1
    kwargs = {k: v for k, v in settings.items() if k not in ("num_frames", "base_num_frames", "overlap_history", "ar_step")}
    ring_full_after = args.kv_sink_blocks + window_blocks
    frames, steady_start = 0, None
    clock.start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights are not block-causal-trained
        stream = pipe.stream("a red circle", mode="kvcache", ar_step=args.kv_ar_step or args.steps, causal_block_size=1,
                             sink_blocks=args.kv_sink_blocks, window_blocks=window_blocks, max_chunks=latent_frames,
                             seed=0, **kwargs)
        for index, chunk in enumerate(stream):
            frames += len(chunk)
            if index + 1 == ring_full_after:
                steady_start = time.perf_counter()
    out = clock.result(frames)
    steady_blocks = latent_frames - ring_full_after
    if steady_start is not None and steady_blocks > 0:
        out["steady_latent_frames_per_s"] = steady_blocks / (time.perf_counter() - steady_start)
    out["ring_blocks"] = ring_full_after
    return out


def _numpy_reference_rollout():
    """tests/kvcache_numpy_reference.KVRollout with the close() the pipeline calls (it holds nothing
    to release: numpy arrays)."""
    import kvcache_numpy_reference

    class NumpyReferenceRollout(kvcache_numpy_reference.KVRollout):
        def close(self) -> None:
            pass

    return NumpyReferenceRollout


def _warm_up_exports(pipe, args, settings, window_blocks: int) -> None:
    """Two blocks of the same stream, so exporting the graphs is not timed."""
    import warnings

    kwargs = {k: v for k, v in settings.items() if k not in ("num_frames", "base_num_frames", "overlap_history", "ar_step")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in pipe.stream("a red circle", mode="kvcache", ar_step=args.kv_ar_step or args.steps, causal_block_size=1,
                             sink_blocks=args.kv_sink_blocks, window_blocks=window_blocks, max_chunks=2, seed=0,
                             **kwargs):
            pass


def run_diffusers(oracle, args, settings, **overrides) -> dict:
    """diffusers' long-video mode; overrides (e.g. the async recipe ar_step=5, causal_block_size=5)."""
    from checkpoints import official_sigmas_scheduler

    oracle.scheduler = official_sigmas_scheduler(settings["shift"])
    clock = Clock()
    # Instance attributes shadow the VAE's methods for this run only (deleted below).
    oracle.vae.decode = clock.wrap_decode(oracle.vae.decode)
    oracle.vae.encode = clock.wrap_encode(oracle.vae.encode)
    kwargs = {k: v for k, v in settings.items() if k != "shift"} | overrides
    clock.start = time.perf_counter()
    with torch.no_grad():
        frames = oracle("a red circle", negative_prompt="", output_type="np",
                        generator=torch.Generator().manual_seed(0), **kwargs).frames[0]
    del oracle.vae.decode, oracle.vae.encode
    return clock.result(len(frames))


def kv_name(args, window_blocks: int, backend: str, driver: str) -> str:
    return (f"skyrt_kvcache_ring_{args.kv_sink_blocks}+{window_blocks}" + ("" if backend == "torch" else f"_{backend}")
            + ("" if driver == "core" else f"_{driver}"))


def kv_runs(args, run) -> list:
    """(name, thunk) of every kvcache stream, each --kv-repeats times; on odd repeats the drivers run in
    reverse order, so neither driver always runs first on a machine whose load drifts."""
    out = []
    for repeat in range(args.kv_repeats):
        drivers = args.kv_drivers if repeat % 2 == 0 else args.kv_drivers[::-1]
        out += [(kv_name(args, w, b, d), lambda w=w, b=b, d=d: run(w, b, d))
                for b in args.kv_backends for w in args.kv_windows for d in drivers]
    return out


def keep_fastest(kept: dict | None, new: dict) -> dict:
    """Of repeated runs the fastest (the least disturbed by other processes), with every duration listed."""
    durations = (kept or {}).get("seconds_all", []) + [new["seconds"]]
    best = new if kept is None or new["seconds"] < kept["seconds"] else kept
    return best | {"seconds_all": durations}


def core_vs_reference(args, results: dict) -> dict:
    """Per kvcache run measured both ways: the core's rate over the numpy driver's (> 1: the core is faster)."""
    out = {}
    for b in args.kv_backends:
        for w in args.kv_windows:
            core, ref = results.get(kv_name(args, w, b, "core")), results.get(kv_name(args, w, b, "numpy_reference"))
            if core is None or ref is None:
                continue
            out[kv_name(args, w, b, "core")] = {
                key: core[key] / ref[key] for key in ("latent_frames_per_s", "denoise_latent_frames_per_s",
                                                      "steady_latent_frames_per_s") if key in core and key in ref}
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from checkpoints import mid_size_model

    with tempfile.TemporaryDirectory() as tmp:
        oracle, model_dir = mid_size_model(Path(tmp), args.dim, args.layers)
        size = args.latent * 8
        settings = dict(num_frames=args.frames, base_num_frames=args.base_frames, overlap_history=args.overlap,
                        height=size, width=size, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                        shift=8.0, ar_step=0)
        latent_frames = (args.frames - 1) // 4 + 1
        runs = kv_runs(args, lambda w, b, d: run_skyrt_kvcache(model_dir, args, settings, w, b, d))
        runs += [(name, run) for name, run in {"skyrt_window_latent_carry": lambda: run_skyrt(model_dir, args, settings, "latent"),
                 "skyrt_window_pixel_carry": lambda: run_skyrt(model_dir, args, settings, "pixel"),
                 "diffusers_long_video": lambda: run_diffusers(oracle, args, settings),
                 # The official async recipe (README of SkyReels-V2): 5-frame causal blocks, ar_step 5.
                 "diffusers_long_video_async": lambda: run_diffusers(oracle, args, settings, ar_step=5,
                                                                     causal_block_size=5)}.items()]
        results = {}
        for name, run in runs:
            if name in args.skip:
                continue
            load_before = os.getloadavg()[0]
            result = run()
            # Other processes on a 2-core machine slow small ops by far more than their share (OpenMP
            # threads spin-wait), so each result records the 1-minute load average around it.
            result["load_average_before_after"] = [load_before, os.getloadavg()[0]]
            print(name, json.dumps(result), flush=True)
            results[name] = keep_fastest(results.get(name), result)
    for r in results.values():
        r["latent_frames_per_s"] = latent_frames / r["seconds"]
        r["denoise_latent_frames_per_s"] = latent_frames / (r["seconds"] - r["vae_seconds"])
    base = results[args.baseline]
    report = {
        "benchmark": "rollout",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": args.threads,
                    "cpu_count": os.cpu_count(), "device": "cpu", "note": args.machine_note},
        "config": vars(args) | {"out": args.out.name, "latent_frames": latent_frames},
        "results": results,
        "baseline": args.baseline,
        "ratios_vs_baseline": {
            name: {"frames_per_s": r["latent_frames_per_s"] / base["latent_frames_per_s"],
                   "denoise_frames_per_s": r["denoise_latent_frames_per_s"] / base["denoise_latent_frames_per_s"],
                   "time_to_first_frame": base["time_to_first_frame_s"] / r["time_to_first_frame_s"]}
            for name, r in results.items()
        },
        "core_vs_numpy_reference": core_vs_reference(args, results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["results"], indent=2))
    print(json.dumps(report["ratios_vs_baseline"], indent=2))
    print(json.dumps(report["core_vs_numpy_reference"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
