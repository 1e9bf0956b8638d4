"""Streaming decode cost per pixel frame: the Wan2.1 VAE vs the tiny decoder (TAEHV's taew2_1), same run.

Both are skyrt's torch modules with RANDOM weights of the real widths (Wan2.1 VAE dim 96; TAEHV
256/128/64): the cost of a decode does not depend on the weights' values. Each repeat streams the
same raw latents through each decoder in turn (interleaved, alternating which goes first), one
latent frame at a time; a latent after the first yields 4 pixel frames, so ms per pixel frame =
ms per later latent / 4 (the first latent, 1 frame and cold caches, is not timed). The share is of
a real-time frame budget (1000 / fps ms per frame), not of a measured DiT step.

    python benchmarks/decoders.py      # both at 128x128, the tiny one also at 480x832, 2 threads
    python benchmarks/decoders.py --sizes 128x128 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="128x128,480x832", help="pixel HxW, comma separated")
    p.add_argument("--wan-sizes", default="128x128",
                   help="sizes where the Wan VAE runs too (it takes ~2 min per latent at 480x832 on 2 cores)")
    p.add_argument("--latents", type=int, default=3, help="latent frames streamed per repeat (>= 2)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--fps", type=float, default=16.0, help="the frame budget's rate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decoders.json")
    return p.parse_args()


def stream_ms_per_pixel_frame(decoder, mu: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Stream mu [1, 16, F, h, w]; ms per pixel frame of latents 1.. (4 frames each), and the pixels."""
    decoder.reset()
    pieces = [decoder.decode_next(mu[:, :, :1])]
    start = time.perf_counter()
    pieces += [decoder.decode_next(mu[:, :, i:i + 1]) for i in range(1, mu.shape[2])]
    seconds = time.perf_counter() - start
    frames = sum(p.shape[2] for p in pieces[1:])
    return 1000 * seconds / frames, torch.cat(pieces, 2)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from skyrt.export import vae as vae_module
    from skyrt.export.tiny import randomize_
    from skyrt.export.tiny_vae import TinyDecoder, TinyStreamingDecoder

    wan = vae_module.WanVAE(vae_module.VAEConfig(dim=96)).eval()
    randomize_(wan, seed=0)
    tiny = TinyDecoder().eval()
    randomize_(tiny, seed=0)
    decoders = {"wan_vae": vae_module.StreamingDecoder(wan), "tiny_taew2_1": TinyStreamingDecoder(tiny)}
    budget_ms = 1000 / args.fps
    results = []
    started = time.perf_counter()
    for size in args.sizes.split(","):
        height, width = (int(v) for v in size.split("x"))
        mu = torch.randn(1, 16, args.latents, height // 8, width // 8, generator=torch.Generator().manual_seed(0))
        names = [n for n in decoders if n != "wan_vae" or size in args.wan_sizes.split(",")]
        times: dict[str, list[float]] = {name: [] for name in names}
        shapes = {}
        with torch.inference_mode():
            for r in range(args.repeats):
                order = names if r % 2 == 0 else list(reversed(names))
                for name in order:
                    ms, pixels = stream_ms_per_pixel_frame(decoders[name], mu)
                    times[name].append(ms)
                    shapes[name] = list(pixels.shape)
        best = {name: min(v) for name, v in times.items()}
        row = {"height": height, "width": width, "latent_frames": args.latents, "pixel_frames": shapes,
               "ms_per_pixel_frame": times, "best_ms_per_pixel_frame": best,
               "share_of_frame_budget": {name: ms / budget_ms for name, ms in best.items()},
               "wan_over_tiny": best["wan_vae"] / best["tiny_taew2_1"] if "wan_vae" in best else None}
        results.append(row)
        print(f"{height}x{width}: " + ", ".join(f"{n} {best[n]:.1f} ms/frame ({best[n] / budget_ms:.2f} of "
                                                 f"{budget_ms:.1f} ms)" for n in best)
              + (f"; wan/tiny {row['wan_over_tiny']:.1f}x" if row["wan_over_tiny"] else ""), flush=True)
    report = {
        "benchmark": "decoders",
        "machine": {"platform": platform.platform(), "torch_threads": args.threads, "device": "cpu",
                    "note": "a 2-core machine shared with other jobs at the time: figures are noisy; "
                            "min over interleaved repeats is reported beside every repeat"},
        "weights": "random, real widths (Wan2.1 VAE dim 96; TAEHV 256/128/64); timings do not depend on values",
        "config": vars(args) | {"out": args.out.name},
        "frame_budget_ms": budget_ms,
        "results": results,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
