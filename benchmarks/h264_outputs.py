"""CPU cost of the server's H.264 outputs per frame: fMP4 stream + HLS encoded once (HLS follows the
fMP4 stream's encoder) against each output running its own libx264, in the same run, ABAB.

    python benchmarks/h264_outputs.py                      # 480x832 and 128x128, 240 frames each
    python benchmarks/h264_outputs.py --sizes 544x960 --frames 480

CPU time is this process's (all threads: libx264 runs its own), so other tenants matter less than to
wall time; the moving test pattern keeps the encoder busy like a real stream. Writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from skyrt.runtime.server.broadcast import Broadcast
from skyrt.runtime.server.encoders import Fmp4Encoder, HlsEncoder


def moving_frames(height: int, width: int, count: int) -> list[np.ndarray]:
    """A textured background scrolling 4 px a frame with a bright square crossing it: motion and detail."""
    rng = np.random.default_rng(0)
    base = (rng.integers(0, 64, (height, width * 2, 3)) + np.linspace(0, 160, width * 2)[None, :, None]).astype(
        np.uint8)
    frames = []
    for i in range(count):
        x = (4 * i) % width
        frame = np.ascontiguousarray(base[:, x:x + width])
        side = max(8, height // 6)
        top, left = (3 * i) % (height - side), (5 * i) % (width - side)
        frame[top:top + side, left:left + side] = 255
        frames.append(frame)
    return frames


def cpu_per_frame(frames: list[np.ndarray], fps: int, shared: bool) -> float:
    """CPU seconds per frame of the fMP4 + HLS outputs, HLS following the fMP4 encoder or not."""
    height, width = frames[0].shape[:2]
    loop = asyncio.new_event_loop()
    broadcast = Broadcast("mp4", capacity=8, needs_keyframe=True)
    broadcast.bind(loop)
    with tempfile.TemporaryDirectory() as folder:
        mp4 = Fmp4Encoder(broadcast, fps, width, height)
        hls = HlsEncoder(Path(folder) / "hls", fps, width, height, leader=mp4 if shared else None)
        started = time.process_time()
        for frame in frames:
            mp4.encode(frame)
            hls.encode(frame)
        took = time.process_time() - started
        mp4.close()
        hls.close()
    loop.close()
    return took / len(frames)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="480x832,128x128", help="HxW list")
    p.add_argument("--frames", type=int, default=240)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2, help="ABAB rounds (the mean is reported)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "h264_outputs.json")
    args = p.parse_args()
    results = {}
    for size in args.sizes.split(","):
        height, width = (int(v) for v in size.lower().split("x"))
        frames = moving_frames(height, width, args.frames)
        runs = {"separate": [], "shared": []}
        for _ in range(args.rounds):
            for label in ("separate", "shared"):
                runs[label].append(cpu_per_frame(frames, args.fps, shared=label == "shared"))
        mean = {label: sum(v) / len(v) for label, v in runs.items()}
        results[size] = {"cpu_ms_per_frame": {k: round(1000 * v, 3) for k, v in mean.items()},
                         "cpu_cores_at_fps": {k: round(v * args.fps, 3) for k, v in mean.items()},
                         "ratio_shared_vs_separate": round(mean["shared"] / mean["separate"], 3),
                         "runs_ms": {k: [round(1000 * x, 3) for x in v] for k, v in runs.items()}}
        print(size, json.dumps(results[size]), flush=True)
    report = {"benchmark": "h264_outputs", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                        "device": "cpu", "load_average_at_end": os.getloadavg()[0]},
              "config": vars(args) | {"out": args.out.name}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
