"""Stage 5 (optional, `--eval-clips N`): detector adherence on held-out prompts over a small
shift / guidance sweep; the best setting becomes the model's recommended sampling."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import world as W
from .config import TrainConfig

# Sampling settings the card recommends until a sweep measures better ones.
DEFAULT_SAMPLING = {"mode": "kvcache", "num_inference_steps": 4, "shift": 2.0, "guidance_scale": 1.0, "ar_step": 2,
                    "causal_block_size": 2, "sink_blocks": 0, "window_blocks": 3}
SWEEP = [{"shift": s, "guidance_scale": g} for s in (1.0, 2.0, 4.0) for g in (1.0, 3.0)]


def stream_clip(pipe, prompt: str, settings: dict, chunks: int, size: int, seed: int) -> np.ndarray:
    """The first `chunks` chunks of a stream, concatenated: uint8 [T, H, W, 3]."""
    stream = pipe.stream(prompt, height=size, width=size, seed=seed, max_chunks=chunks, **settings)
    return np.concatenate(list(stream))


def evaluate(model_dir: Path, cfg: TrainConfig) -> dict:
    """Detector adherence on held-out prompts for each setting of SWEEP; the best one is recommended."""
    import warnings

    import skyrt

    from ..detector import score_clip

    pipe = skyrt.load(model_dir)
    rng = np.random.default_rng([cfg.seed, 5])
    heldout = W.combinations("heldout")
    prompts = [heldout[int(i)] for i in rng.choice(len(heldout), size=cfg.eval_clips, replace=False)]
    results = []
    for setting in SWEEP:
        settings = {**DEFAULT_SAMPLING, **setting}
        scores, made, seconds = [], 0, 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k, attrs in enumerate(prompts):
                tic = time.perf_counter()
                frames = stream_clip(pipe, attrs.prompt, settings, chunks=6, size=cfg.size, seed=k)
                seconds += time.perf_counter() - tic
                made += len(frames)
                scores.append(score_clip(frames, attrs))
        per_attr = {n: float(np.mean([s.correct[n] for s in scores])) for n in W.ATTRIBUTE_NAMES}
        results.append({"settings": settings, "adherence": float(np.mean([s.adherence for s in scores])),
                        "per_attribute": per_attr, "generated_fps": made / seconds})
    # Best adherence; ties go to the cheaper setting (no CFG), then the earlier one.
    best = max(results, key=lambda r: (round(r["adherence"], 3), -r["settings"]["guidance_scale"]))
    return {"clips_per_setting": cfg.eval_clips, "frames_per_clip": int(len(frames)), "results": results,
            "best": best["settings"], "best_adherence": best["adherence"]}
