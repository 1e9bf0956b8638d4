"""TensorRT-RTX engines of a causal-family preset's DiT graphs at the real Wan2.1-1.3B / 480x832 shape.

Writes a random-weight model folder in the preset's layout (benchmarks/causal_family.py, shape 1.3b:
dim 1536, 12 heads, ffn 8960, 60x104 latents, the real Wan2.1 VAE; the DiT's text width is the small
umT5's, not 4096, which changes only the text embedding and cross-attention K/V projections), exports
the preset's DiT graphs (export/preset_export.py: cross_kv, dit_step in its block of 3 frames against
its ring, dit_step_full for the recache chunk / Rolling-Forcing's window) per precision, and builds
each with TensorRT-RTX ahead of time (no GPU needed; engines for compute capabilities 8.0 8.6 8.9 12.0).
Records ONNX and engine bytes and build seconds per graph and precision.

    python benchmarks/preset_engines.py --preset self-forcing                 # 30 layers: ~6 GB of fp32 weights
    python benchmarks/preset_engines.py --preset self-forcing --layers 2     # the real shape, 2 layers (smoke)

Memory: the exporter traces each graph by running it once on example inputs of the real shape, and
dit_step's trace at 480x832 (two blocks in flight: 9360 active tokens against a 6-slot ring, 37440
keys) materialises attention scores of 12 x 9360 x 37440 fp32, ~17 GB per layer call, on top of the
fp32 model (~6 GB for 30 layers): a machine with 64+ GB of RAM (or the GPU box) runs the real shape.
--layers N and --height / --width build fewer layers or a smaller frame with the real width (dim,
heads, ffn): engine bytes are dominated by the weights, which do not depend on the frame size and
grow linearly in layers. FP8: the exporter writes no Q/DQ graphs yet, so no FP8 engine is built
(recorded as such).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GRAPHS = ("cross_kv", "dit_step", "dit_step_full")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="self-forcing")
    p.add_argument("--layers", type=int, default=30, help="DiT layers (30 = Wan2.1-1.3B)")
    p.add_argument("--precisions", default="fp16,bf16,fp8", help="comma-separated: fp16, bf16, fp8")
    p.add_argument("--height", type=int, default=None, help="pixel height (default the preset's 480)")
    p.add_argument("--width", type=int, default=None, help="pixel width (default the preset's 832)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the folders here (default: temp)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "preset_engines.json")
    return p.parse_args(argv)


def build_precision(folder: Path, work: Path, preset: str, precision: str, lora: dict, size: dict) -> dict:
    from skyrt.export.engine import BuildOptions, build_engines, graphs_from_onnx_manifest
    from skyrt.export.preset_export import export_preset_onnx

    onnx_dir, engine_dir = work / f"onnx-{precision}", work / f"engines-{precision}"
    start = time.perf_counter()
    manifest = export_preset_onnx(folder, onnx_dir, preset, precision=precision, graphs=list(GRAPHS), progress=False,
                                  **size, **lora)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    build_engines(graphs_from_onnx_manifest(onnx_dir), engine_dir, BuildOptions(builder="tensorrt-rtx"), progress=False)
    build_s = time.perf_counter() - start
    graphs = {}
    for name in GRAPHS:
        entry = manifest["graphs"][name]
        onnx_bytes = sum((onnx_dir / f).stat().st_size for f in entry["sha256"])
        engine = json.loads((engine_dir / f"{name}.engine.json").read_text())
        graphs[name] = {"onnx_bytes": onnx_bytes, "engine_bytes": engine["engine_bytes"],
                        "build_s": engine["build_seconds"], "profile": entry["profile"].get("latents")}
    for path in [*onnx_dir.glob("*.onnx*"), *engine_dir.glob("*.engine")]:
        path.unlink()  # GBs each: keep the disk free for the next precision
    return {"export_s": export_s, "build_s": build_s, "graphs": graphs,
            "engine_bytes_total": sum(g["engine_bytes"] for g in graphs.values())}


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    import torch

    import causal_family
    from skyrt.runtime.causal_family import get_preset

    preset = get_preset(args.preset)
    causal_family.SHAPES["1.3b"] = {**causal_family.SHAPES["1.3b"], "num_layers": args.layers}
    lora = {"lora_alpha": 4} if preset.lora_names else {}  # causal_family.py writes a rank-4 LoRA
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        folder = causal_family.write_random_folder(work / "model", args.preset, "1.3b", torch.float32)
        for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
            if precision == "fp8":
                results[precision] = {"built": False, "why": "the exporter writes no Q/DQ (fp8) graphs yet; "
                                      "TensorRT-RTX takes FP8 only as Q/DQ in the graph (strongly typed)"}
                continue
            try:
                results[precision] = {"built": True, **build_precision(folder, work, args.preset, precision, lora,
                                                                      dict(height=args.height, width=args.width))}
            except Exception as err:  # record and go on: one precision's failure is a result too
                results[precision] = {"built": False, "error": f"{type(err).__name__}: {err}"[:2000]}
            print(precision, json.dumps(results[precision])[:400], flush=True)
    import tensorrt_rtx

    report = {"benchmark": "preset_engines",
              "config": {**vars(args), "out": args.out.name, "workdir": None if args.workdir is None else "set",
                         "shape": {"dim": 1536, "heads": 12, "ffn_dim": 8960, "layers": args.layers,
                                   "height": args.height or preset.height, "width": args.width or preset.width,
                                   "block_frames": preset.sampling.causal_block_size,
                                   "ring": {"sink_blocks": preset.ring.sink_blocks,
                                            "window_blocks": preset.ring.window_blocks}}},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "tensorrt_rtx": tensorrt_rtx.__version__, "gpu": None},
              "result": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
