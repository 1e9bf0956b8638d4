"""Endless kvcache stream: latent frames far past the 1024-entry RoPE table, memory stays flat.

Streams a tiny random model of the real architecture in mode="kvcache" (frames are decoded by the
streaming VAE too, as the server does) and records resident memory, rebases and throughput.
Writes JSON and exits non-zero if RSS grew more than 5% after warm-up.

    python benchmarks/endless.py --latent-frames 20000       # the long run (~10 min on 2 cores)
    python benchmarks/endless.py --latent-frames 2000 --warmup 200
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, what in (("--latent-frames", 20000, "latent frames streamed"),
                                ("--size", 32, "pixel height = width"),
                                ("--steps", 4, "denoising steps"), ("--ar-step", 2, "DF ar_step"),
                                ("--sink-blocks", 1, "ring sink blocks"), ("--window-blocks", 4, "ring window blocks"),
                                ("--warmup", 500, "latent frames before the RSS baseline")):
        p.add_argument(flag, type=int, default=default, help=f"{what} (default {default})")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "endless.json")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(2)
    import skyrt
    from skyrt.export.tiny import write_official_checkpoint
    from skyrt.runtime import kvcache

    rebases = []
    real_rebase = kvcache.KVCache.rebase
    kvcache.KVCache.rebase = lambda self, shift: (rebases.append(shift), real_rebase(self, shift))[1]

    with tempfile.TemporaryDirectory() as tmp:
        pipe = skyrt.load(write_official_checkpoint(Path(tmp) / "model"))
        process = psutil.Process()
        samples, baseline, frames = [], None, 0
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # random weights are not block-causal-trained
            stream = pipe.stream("a red circle", mode="kvcache", ar_step=args.ar_step, causal_block_size=1,
                                 sink_blocks=args.sink_blocks, window_blocks=args.window_blocks, seed=0,
                                 height=args.size, width=args.size, num_inference_steps=args.steps,
                                 guidance_scale=1.0, max_chunks=args.latent_frames)
            for latent_index, _chunk in enumerate(stream):
                if latent_index >= args.latent_frames:
                    break
                frames += 1
                if latent_index == args.warmup:
                    baseline = process.memory_info().rss
                if latent_index % 250 == 0:
                    samples.append({"latent_frame": latent_index, "rss_mb": process.memory_info().rss / 2**20,
                                    "seconds": time.perf_counter() - start})
        seconds = time.perf_counter() - start
    final = process.memory_info().rss
    growth = (final - baseline) / baseline if baseline else float("nan")
    report = {
        "benchmark": "endless",
        "machine": {"platform": platform.platform(), "device": "cpu", "torch_threads": 2},
        "config": vars(args) | {"out": args.out.name},
        "latent_frames": frames,
        "seconds": seconds,
        "latent_frames_per_s": frames / seconds,
        "rebases": len(rebases),
        "rss_growth_after_warmup": growth,
        "rss_samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples"}, indent=2))
    return 0 if growth < 0.05 else 1


if __name__ == "__main__":
    raise SystemExit(main())
