"""Does a causal preset's stream keep the start image's content? Read by the demo world's detector.

The demo model (skyrt-demo-world-v6, shipped in runtime/models/) is a Wan2.1-architecture DiT trained on
skyrt's procedural world with diffusion forcing; no released causal checkpoint has a detector for what
it draws. So its weights are written into Self-Forcing's checkpoint layout ({"generator_ema": {"model." +
key: tensor}}) and loaded with preset="self-forcing": the preset's sampler, cache and start path run on
a model whose pictures the detector reads. (Neither it nor any released causal checkpoint was trained
to continue a start image: this measures what the runtime's start path gives such a model.)

Per held-out prompt P and seed, three streams with the same noise seed:
- text only (the baseline);
- start image = the world's own first frame of P ("matching": prompt and image agree);
- start image = the first frame of another held-out prompt Q with another background and colour
  ("conflicting": which one the first blocks show).
Per generated block after the start (the start block itself is the image's decode, not counted),
against the start image: pixel mean absolute difference (0-255), the share of frames whose detector
reading (background, colour, shape) equals the start image's own reading, and the distance of the
shape's centre from the image's (pixels, when both are found). The text-only stream is scored against
the same image, so "with / without" compares like with like.

    PYTHONPATH=demo python benchmarks/image_start.py            # 6 prompts x 2 seeds, 4 blocks, 128x128
    python benchmarks/image_start.py --prompts 2 --seeds 1 --blocks 2 --out /tmp/x.json   # smoke
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEMO_PACKAGE = Path(__file__).resolve().parents[1] / "demo"  # skyrt_demo: the world and its detector
if str(DEMO_PACKAGE) not in sys.path:
    sys.path.insert(0, str(DEMO_PACKAGE))
RESULTS = Path(__file__).parent / "results"
READ_KEYS = ("background", "colour", "shape")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=6, help="held-out prompts")
    p.add_argument("--seeds", type=int, default=2, help="noise seeds per prompt")
    p.add_argument("--blocks", type=int, default=4, help="generated blocks scored after the start")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="which prompts are drawn")
    p.add_argument("--out", type=Path, default=RESULTS / "image_start.json")
    return p.parse_args(argv)


def demo_as_self_forcing(folder: Path, out: Path) -> Path:
    """The demo DiT's weights in Self-Forcing's checkpoint layout (their generator_ema entry)."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    path = out / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in state.items()}}, path)
    return path


def reading(frame: np.ndarray):
    from skyrt_demo.detector import read_frame, read_frame_attributes

    return read_frame_attributes(frame), read_frame(frame).center


def score_block(frames: np.ndarray, image: np.ndarray, image_read: dict, image_center) -> dict:
    """One generated block's frames [n, H, W, 3] against the start image."""
    size = image.shape[0]
    agree, distances = [], []
    for frame in frames:
        attrs, center = reading(frame)
        agree.append(all(attrs[k] == image_read[k] for k in READ_KEYS))
        if not (np.isnan(center[0]) or np.isnan(image_center[0])):
            d = (np.asarray(center) - np.asarray(image_center) + size / 2) % size - size / 2  # the world wraps
            distances.append(float(np.hypot(*d)))
    return {"pixel_mad": float(np.abs(frames.astype(np.float64) - image).mean()),
            "reads_as_image": float(np.mean(agree)),
            "centre_distance_px": float(np.mean(distances)) if distances else None}


def stream_blocks(pipe, prompt: str, image, blocks: int, settings: dict, seed: int) -> tuple[list, float]:
    """The generated blocks (uint8 frames each) of a stream, the start's own chunk left out; seconds."""
    stream = pipe.stream(prompt, image=image, seed=seed, **settings)
    t0 = time.perf_counter()
    if image is not None:
        next(stream)  # the start block: the image's still clip, decoded
    chunks = [next(stream) for _ in range(blocks)]
    seconds = time.perf_counter() - t0
    stream.close()
    return chunks, seconds


def summarise(rows: list[dict], blocks: int) -> dict:
    out = {}
    for key in ("pixel_mad", "reads_as_image", "centre_distance_px"):
        per_block = []
        for b in range(blocks):
            values = [r["blocks"][b][key] for r in rows if r["blocks"][b][key] is not None]
            per_block.append(float(np.mean(values)) if values else None)
        out[key] = per_block
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import skyrt
    from skyrt_demo.world import combinations, render_clip

    from skyrt.runtime.default_model import default_model_dir, recommended_sampling

    model_dir = default_model_dir()
    recommended = recommended_sampling(model_dir)
    rng = np.random.default_rng(args.seed)
    heldout = combinations("heldout")
    chosen = [heldout[int(i)] for i in rng.choice(len(heldout), size=args.prompts, replace=False)]
    # The demo's own sampling where the preset lets a user choose it: its block size, shift and guidance.
    settings = dict(height=args.size, width=args.size, causal_block_size=recommended["causal_block_size"],
                    shift=recommended["shift"], guidance_scale=recommended["guidance_scale"])
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = demo_as_self_forcing(model_dir, Path(tmp))
        pipe = skyrt.load(model_dir, preset="self-forcing", checkpoint=checkpoint)
        request = pipe.resolve({"prompt": "x", **settings}, stream=True).request
        runs: dict[str, list] = {"text_only": [], "matching_image": [], "conflicting_image": []}
        seconds, frames_made = 0.0, 0
        started = time.perf_counter()
        for i, attrs in enumerate(chosen):
            other = next(q for q in heldout if q.background != attrs.background and q.colour != attrs.colour
                         and q.shape != attrs.shape)
            images = {"matching_image": render_clip(attrs, 1, args.size, args.size, seed=i).frames[0],
                      "conflicting_image": render_clip(other, 1, args.size, args.size, seed=i).frames[0]}
            for seed in range(args.seeds):
                for name, image in [("text_only", None), *images.items()]:
                    target = images["conflicting_image" if name == "conflicting_image" else "matching_image"]
                    target_read, target_center = reading(target)
                    chunks, s = stream_blocks(pipe, attrs.prompt, image, args.blocks, settings, seed)
                    seconds, frames_made = seconds + s, frames_made + sum(len(c) for c in chunks)
                    row = {"prompt": attrs.prompt, "seed": seed, "image_prompt": None if image is None else (
                        attrs.prompt if name == "matching_image" else other.prompt),
                        "image_read": target_read, "blocks": [score_block(c, target, target_read, target_center)
                                                              for c in chunks]}
                    runs[name].append(row)
                    if name == "conflicting_image":  # the text-only stream against the conflicting image too
                        plain = next(r for r in runs["text_only"] if r["prompt"] == attrs.prompt and r["seed"] == seed)
                        row["text_only_against_this_image"] = [
                            score_block(c, target, target_read, target_center) for c in plain.pop("_chunks")]
                    if name == "text_only":
                        row["_chunks"] = chunks
            print(f"{i + 1}/{len(chosen)} {attrs.prompt}", flush=True)
    summary = {name: summarise(rows, args.blocks) for name, rows in runs.items()}
    conflicting_baseline = [{"blocks": r["text_only_against_this_image"]} for r in runs["conflicting_image"]]
    summary["text_only_vs_conflicting_image"] = summarise(conflicting_baseline, args.blocks)
    report = {
        "benchmark": "image_start",
        "what": __doc__.split("\n\n")[0],
        "model": "skyrt-demo-world-v6 in Self-Forcing's checkpoint layout, preset self-forcing (its 4-step "
                 "warped sampler and ring); not trained for a start image",
        "machine": {"platform": platform.platform(), "torch_threads": args.threads, "device": "cpu"},
        "settings": {k: getattr(request, k) for k in ("height", "width", "causal_block_size", "shift",
                                                      "guidance_scale", "num_inference_steps", "sink_blocks",
                                                      "window_blocks")},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "frames_per_block": 4 * request.causal_block_size,
        "summary_per_generated_block": summary,
        "generated_fps": frames_made / seconds if seconds else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "runs": {name: [{k: v for k, v in r.items() if k != "_chunks"} for r in rows] for name, rows in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, s in summary.items():
        print(f"{name:32s} pixel MAD {[round(v, 1) for v in s['pixel_mad']]}  reads as image "
              f"{[round(v, 2) for v in s['reads_as_image']]}  centre px "
              f"{[None if v is None else round(v, 1) for v in s['centre_distance_px']]}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
