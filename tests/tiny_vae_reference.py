"""Run TAEHV's OWN decoder (madebyollin/taehv's taehv.py) on seeded random weights; store a fixture.

Development-time only: their file is not a dependency of skyrt (and is not vendored), so CI compares
against what this script recorded (tests/fixtures/tiny_vae/taehv_wan21.npz):

    git clone https://github.com/madebyollin/taehv /tmp/taehv      # commit recorded in the fixture
    python tests/tiny_vae_reference.py --taehv /tmp/taehv/taehv.py

What it runs, all theirs: TAEHV(checkpoint_path=None) with its defaults (16 latent channels, patch 1,
decoder_time_upscale (False, True, True): the configuration their constructor gives taew2_1.pth),
then their state-dict keys get seeded weights (`seeded_state`, shared with the test: a numpy
RandomState over the keys in sorted order, scaled so activations stay O(1)) through their
load_state_dict(patch_tgrow_layers(...)), and on fixed latents:
- raw: apply_model_with_memblocks(decoder, z, parallel=True): every decoder frame, unclamped, untrimmed;
- video: decode_video(z, parallel=True): clamped to [0, 1], the 3 startup frames trimmed;
- streaming: StreamingTAEHV.decode(latent) one latent at a time, then decode() until None.
The real widths (256/128/64) are theirs and fixed; the fixture stays small through a tiny latent
(3 frames of 2 x 3).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_vae" / "taehv_wan21.npz"
SEED = 20260
LATENT_SHAPE = (1, 3, 16, 2, 3)  # NTCHW, model-space latents


def seeded_state(shapes: dict[str, tuple[int, ...]], seed: int = SEED) -> dict[str, np.ndarray]:
    """Random float32 weights for `shapes`, the same for the same keys and shapes anywhere: normals of
    std sqrt(1 / fan_in) for weights (He's sqrt(2 / fan_in) grows the residual MemBlocks' activations
    to ~100 and clamps almost every output pixel), 0.05 * normals for biases."""
    rng = np.random.RandomState(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        draw = rng.standard_normal(shape).astype(np.float32)
        if key.endswith("bias"):
            out[key] = 0.05 * draw
        else:
            fan_in = int(np.prod(shape[1:]))
            out[key] = draw * np.float32(np.sqrt(1.0 / fan_in))
    return out


def latents(seed: int = SEED + 1) -> np.ndarray:
    """Model-space latents [1, 3, 16, 2, 3]: normals x 1.5, so the soft clamp's tanh is exercised."""
    return (1.5 * np.random.RandomState(seed).standard_normal(LATENT_SHAPE)).astype(np.float32)


def _commit(taehv_file: Path) -> str:
    try:
        return subprocess.check_output(["git", "-C", str(taehv_file.parent), "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--taehv", type=Path, required=True, help="their taehv.py")
    parser.add_argument("--commit", default=None, help="their commit (default: git rev-parse in its folder)")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("taehv_reference", args.taehv)
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)

    model = theirs.TAEHV(checkpoint_path=None).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {k: torch.from_numpy(v) for k, v in seeded_state(shapes).items()}
    model.load_state_dict(model.patch_tgrow_layers(state))
    z = torch.from_numpy(latents())
    with torch.no_grad():
        raw = theirs.apply_model_with_memblocks(model.decoder, z, True, False)
        video = model.decode_video(z, parallel=True, show_progress_bar=False)
        streaming = theirs.StreamingTAEHV(model)
        frames = []
        for t in range(z.shape[1]):
            frame = streaming.decode(z[:, t:t + 1])
            while frame is not None:
                frames.append(frame)
                frame = streaming.decode()
        stream = torch.cat(frames, 1)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    info = {"repo": "madebyollin/taehv", "commit": args.commit or _commit(args.taehv), "seed": SEED,
            "keys": {k: list(s) for k, s in shapes.items()},
            "note": "their TAEHV(checkpoint_path=None) defaults; raw = apply_model_with_memblocks(parallel=True), "
                    "video = decode_video(parallel=True), streaming = StreamingTAEHV.decode per latent"}
    np.savez_compressed(FIXTURE, z=z.numpy(), raw=raw.numpy(), video=video.numpy(), streaming=stream.numpy(),
                        info=np.array(json.dumps(info)))
    print(f"wrote {FIXTURE}: raw {tuple(raw.shape)} |max| {raw.abs().max():.3g}, video {tuple(video.shape)} "
          f"(unclamped share {((video > 0) & (video < 1)).float().mean():.2f}), streaming {tuple(stream.shape)}, "
          f"streaming - video {(stream - video).abs().max():.2e}; {FIXTURE.stat().st_size} bytes")


if __name__ == "__main__":
    main()
