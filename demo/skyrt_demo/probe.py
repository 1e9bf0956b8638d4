"""What can a demo model draw? Two measurements that localise a failure to the VAE or to the DiT.

- `vae_readback`: world clips (every shape in turn) through the model's VAE, encode then decode, read
  back by the detector: how often each attribute survives the round trip. A DiT cannot draw what
  its VAE cannot represent (the first demo VAE turns small crosses into diamonds).
- `sensitivity`: `train.prompt_sensitivity` on freshly rendered clips encoded by the model's VAE: how
  much the DiT's prediction on the shape depends on each word of the prompt (1.00 = ignored).

    python -m skyrt_demo.probe [--model DIR] [--clips 15] [--radius 0.15,0.20] [--out probe.json]

`--radius` renders the world with another shape-radius range (a fraction of the frame), to ask whether
a larger world would be drawable before training on it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from skyrt.export.vae import normalize_latents
from skyrt.runtime.video_io import to_uint8_frames

from . import world as W
from .detector import score_clip
from .train.data import LatentData, to_pixels
from .train.masks import latent_fg_mask
from .train.sensitivity import prompt_sensitivity

READBACK_FRAMES = 45  # ~2 s: enough for the detector's motion and pan readings
SENSITIVITY_FRAMES = 9  # 3 latent frames: a stream's first causal block and one more


@contextlib.contextmanager
def radius_range(radius: tuple[float, float] | None) -> Iterator[None]:
    """Render the world with shape radii drawn from `radius` (None: the world's own) inside the block."""
    saved = W.RADIUS_RANGE
    W.RADIUS_RANGE = radius or saved
    try:
        yield
    finally:
        W.RADIUS_RANGE = saved


def _probe_attributes(count: int, seed: int) -> list[W.Attributes]:
    """`count` train-split combinations with the shapes taken in turn (every shape equally often)."""
    rng = np.random.default_rng(seed)
    pool = W.combinations("train")
    out = []
    while len(out) < count:
        a = pool[int(rng.integers(len(pool)))]
        if a.shape == W.SHAPES[len(out) % len(W.SHAPES)]:
            out.append(a)
    return out


@torch.no_grad()
def vae_readback(vae, clips: int = 15, size: int = 128, seed: int = 0) -> dict:
    """Detector readings of world clips after a VAE round trip: per-attribute fraction right, and per
    shape what it came back as."""
    right = {name: 0 for name in W.ATTRIBUTE_NAMES}
    came_back: dict[str, list[str | None]] = {s: [] for s in W.SHAPES}
    for k, attrs in enumerate(_probe_attributes(clips, seed)):
        clip = W.render_clip(attrs, READBACK_FRAMES, size, size, seed=seed * 1000 + k)
        decoded = vae.decode(vae.encode(to_pixels(clip.frames[None])))  # [1, 3, T, H, W]
        frames = to_uint8_frames(decoded[0].numpy())  # as a stream would show them
        score = score_clip(frames, attrs)
        for name in W.ATTRIBUTE_NAMES:
            right[name] += int(score.correct[name])
        came_back[attrs.shape].append(score.read["shape"])
    return {"clips": clips, "right": {n: v / clips for n, v in right.items()}, "shape_read_as": came_back}


@torch.no_grad()
def sensitivity(dit, vae, text_encoder, clips: int = 24, size: int = 128, seed: int = 0) -> dict:
    """`train.prompt_sensitivity` on `clips` freshly rendered clips (no prompt switch)."""
    attrs = _probe_attributes(clips, seed + 1)
    rendered = [W.render_clip(a, SENSITIVITY_FRAMES, size, size, seed=seed * 1000 + k) for k, a in enumerate(attrs)]
    latents = torch.cat([normalize_latents(vae.encode(to_pixels(c.frames[None]))) for c in rendered])  # [N, 16, 3, h, w]
    data = LatentData(latents=latents, prompts=[a.prompt for a in attrs], second_prompts=[""] * clips,
                      switch_latent=np.full(clips, -1), fg=torch.from_numpy(np.stack([latent_fg_mask(c, size)
                                                                                       for c in rendered])))
    block = max(1, dit.config.num_frame_per_block)
    context_of = lambda prompts: torch.as_tensor(text_encoder.encode(prompts)).float()  # noqa: E731
    return prompt_sensitivity(dit, context_of, data, block=block, clips=clips, seed=seed)


def probe(model_dir: Path, clips: int = 15, radius: tuple[float, float] | None = None, size: int = 128) -> dict:
    """Both measurements for one model folder (official layout)."""
    from skyrt.export.loaders import _load_official

    dit, vae, text_encoder = _load_official(Path(model_dir), torch.float32)
    dit.eval()
    vae.eval()
    with radius_range(radius):
        return {"model": Path(model_dir).name, "radius_range": list(W.RADIUS_RANGE), "size": size,
                "vae_readback": vae_readback(vae, clips, size),
                "prompt_sensitivity": sensitivity(dit, vae, text_encoder, max(clips, 10), size)}


def main(argv: list[str] | None = None) -> int:
    from skyrt.runtime.default_model import default_model_dir

    p = argparse.ArgumentParser(prog="python -m skyrt_demo.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped demo model)")
    p.add_argument("--clips", type=int, default=15, help="clips per measurement (shapes in turn)")
    p.add_argument("--radius", default=None, help="shape radius range 'lo,hi' as a fraction of the frame")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    radius = None
    if args.radius:
        try:
            lo, hi = (float(v) for v in args.radius.split(","))
        except ValueError:
            p.error(f"--radius {args.radius!r}: expected two fractions 'lo,hi', e.g. 0.15,0.20")
        if not 0 < lo <= hi < 0.5:
            p.error(f"--radius {args.radius!r}: need 0 < lo <= hi < 0.5 (a fraction of the frame)")
        radius = (lo, hi)
    torch.set_num_threads(args.threads)
    report = probe(args.model or default_model_dir(), args.clips, radius, args.size)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
