"""Streaming VAE decode on the CPU: seconds per latent frame with the oneDNN conv path vs plain torch.

torch's CPU conv3d picks an im2col fallback for the Wan VAE's small-channel causal convs; skyrt's
CausalConv3d calls oneDNN directly in eager fp32 CPU inference (export/vae.py). Both paths run here
on the same random VAE and latents, one after the other, and must agree to fp32 rounding.

    python benchmarks/vae_decode.py                  # tiny-width VAE (dim 8), 256x256 pixels
    python benchmarks/vae_decode.py --dim 96 --size 128   # the real Wan2.1 width, smaller frames
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
    p.add_argument("--dim", type=int, default=8, help="VAE base width (Wan2.1: 96)")
    p.add_argument("--size", type=int, default=256, help="pixel height = width")
    p.add_argument("--frames", type=int, default=4, help="latent frames decoded one at a time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vae_decode.json")
    return p.parse_args()


def decode_stream(vae, z: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Decode z [1, 16, F, h, w] one latent frame at a time; returns pixels and seconds per latent frame
    (the first frame, which only warms the caches, is not timed)."""
    from skyrt.export.vae import StreamingDecoder

    decoder = StreamingDecoder(vae)
    pieces = [decoder.decode_next(z[:, :, :1])]
    start = time.perf_counter()
    pieces += [decoder.decode_next(z[:, :, i : i + 1]) for i in range(1, z.shape[2])]
    return torch.cat(pieces, dim=2), (time.perf_counter() - start) / (z.shape[2] - 1)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from skyrt.export import vae as vae_module
    from skyrt.export.tiny import randomize_

    vae = vae_module.WanVAE(vae_module.VAEConfig(dim=args.dim)).eval()
    randomize_(vae, seed=0)
    z = torch.randn(1, 16, args.frames, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        vae_module.CPU_FAST_CONV = False
        plain, plain_s = decode_stream(vae, z)
        vae_module.CPU_FAST_CONV = True
        fast, fast_s = decode_stream(vae, z)
    report = {
        "benchmark": "vae_decode",
        "machine": {"platform": platform.platform(), "torch_threads": args.threads, "device": "cpu"},
        "config": vars(args) | {"out": args.out.name},
        "seconds_per_latent_frame": {"plain_torch_conv3d": plain_s, "onednn_conv": fast_s},
        "speedup": plain_s / fast_s,
        "max_abs_diff": (plain - fast).abs().max().item(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
