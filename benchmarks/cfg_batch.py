"""Classifier-free guidance in kvcache mode: cond and uncond as one batch of 2 vs one DiT call each.

The torch backend's stream session (export/torch_backend.py TorchKVStreamSession) runs both prompts of
a guided stream as one batch (the shorter prompt's keys padded under a -inf bias); before, the rollout
made one DiT call per prompt, which `LoopedSession` below does again. Both stream
the same prompt from the same seed on the same model (default: the shipped demo model at its
recommended settings, guidance 3), in alternating rounds so machine noise hits both alike; the
report gives generated frames per second (decode included: what `skyrt serve` sees), the median
ratio, and the largest pixel difference between the two streams (the batch changes summation
order only). Writes JSON.

    python benchmarks/cfg_batch.py                    # demo model, 5 rounds of 12 chunks
    python benchmarks/cfg_batch.py --rounds 2 --chunks 4   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

PROMPT = "a red circle bouncing on a dark blue background, camera panning left"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the built-in demo model)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model's recommendation, "
                   "or 3 where it recommends none above 1")
    p.add_argument("--chunks", type=int, default=12, help="stream chunks per timed run")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (batched, looped) per run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cfg_batch.json")
    return p.parse_args(argv)


def stream_frames(pipe, settings: dict, chunks: int) -> tuple[np.ndarray, float]:
    """(uint8 frames [T, H, W, 3], seconds) of the first `chunks` chunks of a stream."""
    tic = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = np.concatenate(list(pipe.stream(PROMPT, seed=0, max_chunks=chunks, **settings)))
    return frames, time.perf_counter() - tic


def looped_session_opener(backend):
    """open_kv_stream giving sessions that run one DiT call per prompt context (batch 1 each, each
    prompt at its own length), what the rollout did before batching."""
    import torch

    from skyrt.export.cached_step import CachedStep
    from skyrt.export.torch_backend import TorchKVStreamSession

    class LoopedSession(TorchKVStreamSession):
        @torch.inference_mode()
        def set_prompts(self, contexts):
            super().set_prompts(contexts)
            prompts = [self.backend.dit.cross_attention_kv(c.value, collapse_padding=True) for c in contexts]
            step = CachedStep(self.backend.dit)

            def looped(x, t, _batched_cross, ck, cv, valid, cos, sin, fps=None, causal_block_size=None):
                rows = lambda a, axis=0: None if a is None else a.narrow(axis, b, 1)  # noqa: E731
                outs = []
                for b in range(x.shape[0]):
                    outs.append(step(rows(x), rows(t), prompts[b], rows(ck, 1), rows(cv, 1), valid, cos, sin,
                                     fps=rows(fps), causal_block_size=causal_block_size))
                v = torch.cat([o[0] for o in outs])
                if outs[0][1] is None:  # a window step: no K/V
                    return v, None, None
                return v, torch.cat([o[1] for o in outs], dim=1), torch.cat([o[2] for o in outs], dim=1)

            self._step = looped

    return lambda spec: LoopedSession(backend, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import skyrt
    from skyrt.runtime.default_model import default_model_dir, recommended_sampling

    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else default_model_dir()
    settings = recommended_sampling(model)
    recommended = settings.get("guidance_scale", 1.0)
    guidance = args.guidance_scale or (recommended if recommended > 1 else 3.0)
    settings = {**settings, "guidance_scale": guidance}
    pipe = skyrt.load(model)
    backend = pipe.backend
    batched_open = backend.open_kv_stream
    looped_open = looped_session_opener(backend)

    def run(opener) -> tuple[np.ndarray, float]:
        backend.open_kv_stream = opener
        try:
            return stream_frames(pipe, settings, args.chunks)
        finally:
            del backend.open_kv_stream  # back to the class's own method

    run(batched_open)  # warm-up: first-call allocations and thread pools
    seconds = {"batched": [], "looped": []}
    frames = {}
    for _ in range(args.rounds):
        for name, opener in (("batched", batched_open), ("looped", looped_open)):
            frames[name], took = run(opener)
            seconds[name].append(took)
    count = len(frames["batched"])
    fps = {name: count / statistics.median(s) for name, s in seconds.items()}
    diff = int(np.abs(frames["batched"].astype(np.int16) - frames["looped"].astype(np.int16)).max())
    report = {
        "benchmark": "cfg_batch",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu"},
        "config": {"model": model.name, "settings": settings, "chunks": args.chunks, "frames": count,
                   "rounds": args.rounds, "threads": args.threads, "prompt": PROMPT},
        "generated_fps": fps,
        "seconds": seconds,
        "ratio_batched_vs_looped": fps["batched"] / fps["looped"],
        "max_pixel_difference": diff,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{model.name}, guidance {guidance}: batched {fps['batched']:.1f} fps, one call per prompt "
          f"{fps['looped']:.1f} fps ({report['ratio_batched_vs_looped']:.2f}x); largest pixel difference {diff}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
