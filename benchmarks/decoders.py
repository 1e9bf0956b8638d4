"""Streaming decode cost per pixel frame: the Wan2.1 VAE vs the tiny decoder (TAEHV's taew2_1), same run.

Both are skyrt's torch modules with RANDOM weights of the real widths (Wan2.1 VAE dim 96; TAEHV
256/128/64): the cost of a decode does not depend on the weights' values. Each repeat streams the
same raw latents through each decoder in turn (interleaved, alternating which goes first), one
latent frame at a time; a latent after the first yields 4 pixel frames, so ms per pixel frame =
ms per later latent / 4 (the first latent, 1 frame and cold caches, is not timed). The share is of
a real-time frame budget (1000 / fps ms per frame), not of a measured DiT step.

The same run then does it again on onnxruntime's CPU provider (`--ort-sizes`, default 128x128): the
exported streaming graphs skyrt's onnxruntime backend runs (the Wan VAE's vae_decode_first / _step from
export/onnx_export.py, the tiny decoder's step from export/tiny_vae.py), each session fed one latent
frame at a time with its caches / memories carried as graph inputs and outputs, interleaved the same way.

    python benchmarks/decoders.py      # both at 128x128, the tiny one also at 480x832, 2 threads
    python benchmarks/decoders.py --sizes 128x128 --repeats 3
    python benchmarks/decoders.py --sizes "" --ort-sizes 128x128 --out /tmp/ort.json   # onnxruntime only
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
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
    p.add_argument("--ort-sizes", default="128x128", help="sizes run on onnxruntime-CPU too (empty: none)")
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


class OrtStreamingGraphs:
    """A streaming decoder made of exported graphs on onnxruntime-CPU: `first` for latent 0 (None: the
    same graph as `step`, dropping its first `drop` frames), `step` after it; every input but the first
    is a cache carried from the previous call's outputs (their names with `new_` in front)."""

    def __init__(self, step_path: Path, first_path: Path | None, threads: int, drop: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # the backend's default
        make = lambda p: ort.InferenceSession(str(p), sess_options=options,  # noqa: E731
                                              providers=["CPUExecutionProvider"])
        self.step = make(step_path)
        self.first = make(first_path) if first_path is not None else self.step
        self.drop = drop
        self.reset()

    def reset(self) -> None:
        self.caches = None

    def decode_next(self, mu_frame: torch.Tensor) -> torch.Tensor:
        starting = self.caches is None
        session = self.first if starting else self.step
        inputs = session.get_inputs()
        if starting:
            self.caches = {i.name: np.zeros(i.shape, np.float32) for i in inputs[1:]}
        feeds = {inputs[0].name: mu_frame.numpy(), **{i.name: self.caches[i.name] for i in inputs[1:]}}
        names = [o.name for o in session.get_outputs()]
        pixels, *new = session.run(names, feeds)
        self.caches = {n[len("new_"):]: v for n, v in zip(names[1:], new)}
        return torch.from_numpy(pixels[:, :, self.drop:] if starting else pixels)


def export_ort_decoders(wan, tiny, height: int, width: int, folder: Path, threads: int) -> dict:
    """The Wan VAE's two decode graphs and the tiny decoder's step graph for height x width, as sessions."""
    from skyrt.export.onnx_export import OnnxProfile, build_graph_spec, export_graph
    from skyrt.export.tiny_vae import STARTUP_FRAMES, export_tiny_decoder_onnx

    profile = OnnxProfile(height=height, width=width)
    for name in ("vae_decode_first", "vae_decode_step"):
        export_graph(build_graph_spec(name, None, wan, None, profile), folder, profile.opset, 2 ** 31)
    tiny_path = export_tiny_decoder_onnx(tiny, folder / "tiny_decoder_step.onnx", height // 8, width // 8)
    return {"wan_vae": OrtStreamingGraphs(folder / "vae_decode_step.onnx", folder / "vae_decode_first.onnx", threads),
            "tiny_taew2_1": OrtStreamingGraphs(tiny_path, None, threads, drop=STARTUP_FRAMES)}


def time_decoders(decoders: dict, names: list[str], mu: torch.Tensor, repeats: int, budget_ms: float,
                  label: str) -> dict:
    """Interleaved repeats (alternating which goes first) of every decoder in `names` on the same mu."""
    height, width = mu.shape[3] * 8, mu.shape[4] * 8
    times: dict[str, list[float]] = {name: [] for name in names}
    shapes, outputs = {}, {}
    with torch.inference_mode():
        for r in range(repeats):
            for name in (names if r % 2 == 0 else list(reversed(names))):
                ms, pixels = stream_ms_per_pixel_frame(decoders[name], mu)
                times[name].append(ms)
                shapes[name], outputs[name] = list(pixels.shape), pixels
    best = {name: min(v) for name, v in times.items()}
    row = {"height": height, "width": width, "latent_frames": mu.shape[2], "pixel_frames": shapes,
           "ms_per_pixel_frame": times, "best_ms_per_pixel_frame": best,
           "share_of_frame_budget": {name: ms / budget_ms for name, ms in best.items()},
           "wan_over_tiny": best["wan_vae"] / best["tiny_taew2_1"] if "wan_vae" in best else None}
    print(f"{label} {height}x{width}: " + ", ".join(f"{n} {best[n]:.1f} ms/frame ({best[n] / budget_ms:.2f} of "
                                                    f"{budget_ms:.1f} ms)" for n in best)
          + (f"; wan/tiny {row['wan_over_tiny']:.1f}x" if row["wan_over_tiny"] else ""), flush=True)
    return row, outputs


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
    def latents(size: str) -> torch.Tensor:
        height, width = (int(v) for v in size.split("x"))
        return torch.randn(1, 16, args.latents, height // 8, width // 8, generator=torch.Generator().manual_seed(0))

    for size in filter(None, args.sizes.split(",")):
        names = [n for n in decoders if n != "wan_vae" or size in args.wan_sizes.split(",")]
        row, _ = time_decoders(decoders, names, latents(size), args.repeats, budget_ms, "torch")
        results.append(row)
    ort_results = []
    for size in filter(None, args.ort_sizes.split(",")):
        height, width = (int(v) for v in size.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            sessions = export_ort_decoders(wan, tiny, height, width, Path(tmp), args.threads)
            row, pixels = time_decoders(sessions, list(sessions), latents(size), args.repeats, budget_ms,
                                        "onnxruntime-cpu")
        with torch.inference_mode():  # the graphs decode what the torch modules decode
            torch_pixels = {n: stream_ms_per_pixel_frame(decoders[n], latents(size))[1] for n in sessions}
        row["max_abs_vs_torch"] = {n: float((pixels[n] - torch_pixels[n]).abs().max()) for n in sessions}
        ort_results.append(row)
    report = {
        "benchmark": "decoders",
        "machine": {"platform": platform.platform(), "torch_threads": args.threads, "device": "cpu",
                    "note": "a 2-core machine shared with other jobs at the time: figures are noisy; "
                            "min over interleaved repeats is reported beside every repeat"},
        "weights": "random, real widths (Wan2.1 VAE dim 96; TAEHV 256/128/64); timings do not depend on values",
        "config": vars(args) | {"out": args.out.name},
        "frame_budget_ms": budget_ms,
        "results": results,
        "onnxruntime_cpu": {"what": "the exported streaming graphs on onnxruntime's CPU provider, caches carried "
                                    "as graph inputs/outputs (what the onnxruntime backend runs)",
                            "onnxruntime": __import__("onnxruntime").__version__ if ort_results else None,
                            "results": ort_results},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
