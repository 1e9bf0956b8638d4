"""Rollout throughput: skyrt kvcache and window modes vs diffusers' SkyReelsV2DiffusionForcingPipeline.

Same random mid-size model (weights shared through the diffusers layout), same CPU, same settings,
one run each, measured back to back so the ratio is meaningful on a noisy machine. Reports steady
latent frames per second and time to first decoded frame, and writes JSON.

    python benchmarks/rollout.py                      # default mid-size config
    python benchmarks/rollout.py --dim 128 --layers 2 --latent 16 --steps 4 --frames 33   # quick

skyrt's kvcache mode streams the same number of latent frames (blocks of 1 frame, async).
"""
from __future__ import annotations

import argparse
import json
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
    p.add_argument("--frames", type=int, default=57, help="pixel frames of the long video")
    p.add_argument("--base-frames", type=int, default=17)
    p.add_argument("--overlap", type=int, default=5)
    p.add_argument("--guidance-scale", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-ar-step", type=int, default=5, help="ar_step of the kvcache stream")
    p.add_argument("--kv-sink-blocks", type=int, default=1)
    p.add_argument("--kv-window-blocks", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rollout.json")
    return p.parse_args()


class FirstFrameClock:
    """Wraps a VAE decode to note when the first decoded frame exists."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None

    def mark(self):
        if self.first is None:
            self.first = time.perf_counter() - self.start


def run_skyrt(model_dir, args, settings, carry: str) -> dict:
    import skyrt

    pipe = skyrt.load(model_dir)
    clock = FirstFrameClock()
    decode = pipe.backend.vae_decode
    pipe.backend.vae_decode = lambda mu: (decode(mu), clock.mark())[0]
    clock.start = time.perf_counter()
    frames = pipe.generate("a red circle", negative_prompt="", overlap_carry=carry, progress=False, seed=0,
                           **settings)
    total = time.perf_counter() - clock.start
    return {"seconds": total, "time_to_first_frame_s": clock.first, "pixel_frames": len(frames)}


def run_skyrt_kvcache(model_dir, args, settings) -> dict:
    """mode="kvcache" stream: blocks of one latent frame, async (--kv-ar-step), a ring of
    --kv-sink-blocks + --kv-window-blocks; the same number of latent frames as the long video."""
    import warnings

    import skyrt

    pipe = skyrt.load(model_dir)
    latent_frames = (settings["num_frames"] - 1) // 4 + 1
    kwargs = {k: v for k, v in settings.items() if k not in ("num_frames", "base_num_frames", "overlap_history", "ar_step")}
    start = time.perf_counter()
    first, frames = None, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights are not block-causal-trained
        for chunk in pipe.stream("a red circle", mode="kvcache", ar_step=args.kv_ar_step, causal_block_size=1,
                                 sink_blocks=args.kv_sink_blocks, window_blocks=args.kv_window_blocks,
                                 max_chunks=latent_frames, seed=0, **kwargs):
            first = first or time.perf_counter() - start
            frames += len(chunk)
    return {"seconds": time.perf_counter() - start, "time_to_first_frame_s": first, "pixel_frames": frames}


def run_diffusers(oracle, args, settings) -> dict:
    from checkpoints import official_sigmas_scheduler

    oracle.scheduler = official_sigmas_scheduler(settings["shift"])
    clock = FirstFrameClock()
    decode = oracle.vae.decode
    oracle.vae.decode = lambda *a, **k: (decode(*a, **k), clock.mark())[0]
    kwargs = {k: v for k, v in settings.items() if k != "shift"}
    clock.start = time.perf_counter()
    with torch.no_grad():
        frames = oracle("a red circle", negative_prompt="", output_type="np",
                        generator=torch.Generator().manual_seed(0), **kwargs).frames[0]
    total = time.perf_counter() - clock.start
    return {"seconds": total, "time_to_first_frame_s": clock.first, "pixel_frames": len(frames)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from checkpoints import build_diffusers_pipeline, write_diffusers_layout

    heads = max(1, args.dim // 64)
    with tempfile.TemporaryDirectory() as tmp:
        oracle = build_diffusers_pipeline(Path(tmp), num_attention_heads=heads, attention_head_dim=args.dim // heads,
                                          ffn_dim=4 * args.dim, num_layers=args.layers)
        model_dir = write_diffusers_layout(oracle, Path(tmp) / "model")
        size = args.latent * 8
        settings = dict(num_frames=args.frames, base_num_frames=args.base_frames, overlap_history=args.overlap,
                        height=size, width=size, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                        shift=8.0, ar_step=0)
        latent_frames = (args.frames - 1) // 4 + 1
        results = {"skyrt_kvcache": run_skyrt_kvcache(model_dir, args, settings),
                   "skyrt_window_pixel_carry": run_skyrt(model_dir, args, settings, "pixel"),
                   "skyrt_window_latent_carry": run_skyrt(model_dir, args, settings, "latent"),
                   "diffusers_long_video": run_diffusers(oracle, args, settings)}
    for r in results.values():
        r["latent_frames_per_s"] = latent_frames / r["seconds"]
    base = results["diffusers_long_video"]
    report = {
        "benchmark": "rollout",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": args.threads,
                    "device": "cpu"},
        "config": vars(args) | {"out": args.out.name, "latent_frames": latent_frames},
        "results": results,
        "ratios_vs_diffusers": {
            name: {"frames_per_s": r["latent_frames_per_s"] / base["latent_frames_per_s"],
                   "time_to_first_frame": base["time_to_first_frame_s"] / r["time_to_first_frame_s"]}
            for name, r in results.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["results"], indent=2))
    print(json.dumps(report["ratios_vs_diffusers"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
