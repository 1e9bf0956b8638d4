"""Causal-family stream speed on the torch backend: a preset's rollout at a real or tiny shape.

Writes a random-weight model folder in the preset's own layout (its checkpoint file, the Wan2.1 VAE;
a small umT5), loads it with skyrt.load(folder, preset=...) like a release, streams blocks and reports
per-block latency (median, p90), generated frames per second with and without the streaming VAE
decode, and load time. JSON out.

    python benchmarks/causal_family.py --shape 1.3b --device cuda --dtype bfloat16 --blocks 40   # a GPU
    python benchmarks/causal_family.py --shape tiny --blocks 8                                    # CPU smoke

--shape 1.3b is Wan2.1-T2V-1.3B (dim 1536, 12 heads, 30 layers, ffn 8960) at 480x832 (60x104 latents,
1560 tokens per frame), the real Wan2.1 VAE shape, blocks of 3 latent frames = 12 video frames (9 for
the first). The one difference from a release: the DiT's text input is the small umT5's width instead
of 4096 (text embedding runs once per prompt, not per step). Anchors: Self-Forcing reports 17 fps on
one H100 (4 steps, blocks of 3), FlashDreams ~35 fps. Random weights make noise, not video: only the
speed means anything. No GPU has run this yet: the numbers in results/ are the CPU smoke shape.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

SHAPES = {
    # dim, heads, layers, ffn, (latent h, w)
    "1.3b": dict(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960, freq_dim=256, latent=(60, 104)),
    "tiny": dict(dim=64, num_heads=2, num_layers=2, ffn_dim=128, freq_dim=32, latent=(16, 16)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="self-forcing")
    p.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--blocks", type=int, default=8, help="blocks to stream (the first is warm-up)")
    p.add_argument("--no-decode", action="store_true", help="latents only (no streaming VAE)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the model folder here (default: temp)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "causal_family.json")
    return p.parse_args(argv)


def write_random_folder(folder: Path, preset_name: str, shape: str, dtype: torch.dtype,
                        text_dim: Optional[int] = None) -> Path:
    """Wan2.1 files (small umT5, VAE of the real or tiny shape) + the preset's checkpoint, random weights.
    text_dim: the DiT's context width (default the small umT5's; 4096 is umT5-xxl's, the real one)."""
    from skyrt.export import vae as vae_module
    from skyrt.export.dit import DiTConfig, WanDiT
    from skyrt.export.tiny import randomize_, write_official_checkpoint
    from skyrt.runtime.causal_family import get_preset

    preset = get_preset(preset_name)
    spec = {k: v for k, v in SHAPES[shape].items() if k != "latent"}
    vae = vae_module.WAN21 if shape == "1.3b" else vae_module.TINY
    # config.json, VAE, umT5 and tokenizer come from the tiny-checkpoint writer with a 1-layer DiT
    # stand-in; the family's own checkpoint then holds the DiT that is measured.
    write_official_checkpoint(folder, dit_config=DiTConfig(dim=32, num_heads=2, num_layers=1, ffn_dim=32,
                                                           freq_dim=32, text_dim=32), vae_config=vae)
    text_dim = text_dim or json.loads((folder / "config.json").read_text())["text_dim"]
    config = DiTConfig(**spec, text_dim=text_dim)
    (folder / "config.json").write_text(json.dumps(config.to_official(), indent=2))
    with torch.device("meta"):
        dit = WanDiT(config)
    dit = randomize_(dit.to_empty(device="cpu"), seed=0).to(dtype)
    for stale in folder.glob("*.safetensors"):
        stale.unlink()  # the stand-in DiT: a preset folder's Wan2.1 base DiT is never read
    checkpoint = folder / preset.checkpoint_names[0]
    checkpoint.parent.mkdir(parents=True, exist_ok=True)  # Causal-Forcing's names have a folder (framewise/...)
    entry = "generator_ema" if preset.use_ema else "generator"
    torch.save({entry: {f"model.{k}": v for k, v in dit.state_dict().items()}}, checkpoint)
    if preset.lora_names:  # a rank-4 LoRA of zeros: merged like a real one, changes nothing
        lora = {}
        for name, module in dit.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("blocks."):
                lora[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(4, module.in_features, dtype=dtype)
                lora[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(module.out_features, 4, dtype=dtype)
        torch.save({"generator_lora": lora}, folder / preset.lora_names[0])
    return folder


def measure(folder: Path, args) -> dict:
    import skyrt
    from skyrt.runtime.causal_family import get_preset

    dtype = getattr(torch, args.dtype)
    options = {"lora_alpha": 4} if get_preset(args.preset).lora_names else {}
    start = time.perf_counter()
    pipe = skyrt.load(folder, preset=args.preset, device=args.device, dtype=dtype, **options)
    load_s = time.perf_counter() - start
    h, w = SHAPES[args.shape]["latent"]
    stream = pipe.stream("a red fox running through snow", height=8 * h, width=8 * w, seed=0,
                         output="latent" if args.no_decode else "frames", max_chunks=args.blocks)
    times, frames = [], []
    last = time.perf_counter()
    for chunk in stream:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last)
        frames.append(chunk.shape[1] if args.no_decode else chunk.shape[0])
        last = now
    steady = np.array(times[1:]) if len(times) > 1 else np.array(times)
    video_frames_per_block = 4 * pipe.preset.sampling.causal_block_size
    return {
        "load_s": load_s, "first_block_s": times[0], "block_s_median": float(np.median(steady)),
        "block_s_p90": float(np.percentile(steady, 90)), "blocks": len(times),
        "video_fps_steady": video_frames_per_block / float(np.median(steady)),
        "decoded": not args.no_decode, "chunk_sizes": sorted(set(frames)),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():  # scoped: tests call main() in-process
        folder = (args.workdir or Path(tmp)) / f"{args.preset}-{args.shape}"
        folder.mkdir(parents=True, exist_ok=True)
        write_random_folder(folder, args.preset, args.shape, dtype)
        result = measure(folder, args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {"benchmark": "causal_family", "config": {**vars(args), "out": args.out.name,
                                                       "workdir": None if args.workdir is None else "set"},
              "machine": {"platform": platform.platform(), "device": device, "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads()},
              "result": result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
