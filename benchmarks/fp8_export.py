"""FP8 export of a tiny preset's DiT graphs: ONNX / engine bytes fp32 vs fp16 vs fp8, and the FP8 error.

Writes a random-weight Self-Forcing folder of the tiny shape (benchmarks/causal_family.py "tiny": dim 64,
2 layers, 128x128 pixels), exports cross_kv + dit_step in fp32, fp16 and fp8 (export/preset_export.py; fp8 =
fp16 graphs with FP8 weight-only Q/DQ, export/quantize.py), quantizes the fp32 dit_step too (weight-only
and weights+activations, calibrated on 4 synthetic input sets) so that onnxruntime-CPU can measure the
FP8 error against the fp32 graph, and builds every dit_step with TensorRT-RTX for compute capability 8.9
(built, not run: no GPU here). Inputs are synthetic (random latents, caches and cross K/V, a real
timestep sinusoid, unit-norm RoPE pairs): the errors are the graph's sensitivity to FP8, not a quality
measure.

    python benchmarks/fp8_export.py        # -> benchmarks/results/fp8_export.json (a few minutes on 2 cores)
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

HERE = Path(__file__).resolve().parent
PRESET = "self-forcing"
GRAPHS = ("cross_kv", "dit_step")
RING = dict(sink_blocks=1, window_blocks=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "results" / "fp8_export.json")
    p.add_argument("--shapes", default="tiny,1.3b-width-1-layer",
                   help="comma-separated: tiny (dim 64, 2 layers, 128x128 px) and/or 1.3b-width-1-layer (Wan2.1-1.3B's "
                        "dim 1536 / 12 heads / ffn 8960, one layer, 64x64 px: weights big enough to show in the engine)")
    return p.parse_args(argv)


def as_graph_dtypes(feeds: dict, entry: dict) -> dict:
    """feeds cast to the dtypes the graph's inputs have (an fp16 graph takes fp16 t_emb, K/V, RoPE)."""
    dtypes = {s["name"]: np.dtype(s["dtype"]) for s in entry["inputs"]}
    return {k: v.astype(dtypes[k]) for k, v in feeds.items()}


def synthetic_feeds(entry: dict, seed: int, dtype=np.float32) -> dict:
    """One input set of a dit_step graph from its manifest entry (batch 1, one block of frames)."""
    from skyrt.runtime.rope import timestep_sinusoid

    rng = np.random.default_rng(seed)
    frames = entry["block_frames"] if "block_frames" in entry else entry["shape_config"]["block_frames"]
    sizes = {"batch": 1, "frames": frames}
    feeds = {}
    for spec in entry["inputs"]:
        shape = [sizes.get(d, d) if isinstance(d, str) else d for d in spec["shape"]]
        name = spec["name"]
        if name == "t_emb":
            feeds[name] = timestep_sinusoid(rng.uniform(0, 1000, shape[:2]), shape[2]).astype(dtype)
        elif name == "slot_valid":
            feeds[name] = np.ones(shape, bool)
        elif name in ("rope_cos", "rope_sin"):
            continue
        else:
            feeds[name] = rng.standard_normal([s if isinstance(s, int) else 0 for s in shape]).astype(
                np.float32 if name == "latents" else dtype)
    tokens = feeds["latents"].shape[2] * (feeds["latents"].shape[3] // 2) * (feeds["latents"].shape[4] // 2)
    half = next(s for s in entry["inputs"] if s["name"] == "rope_cos")["shape"][1]
    angles = rng.uniform(0, 2 * np.pi, (tokens, half))
    feeds["rope_cos"], feeds["rope_sin"] = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return feeds


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_error(path: Path, reference: list, feeds: dict) -> dict:
    """Max |out - fp32 out| per output of graph `path` on onnxruntime-CPU, or why it did not run."""
    try:
        got = session(path).run(None, feeds)
    except Exception as err:  # an ORT CPU provider without a kernel for the graph's types
        return {"not_run": str(err).splitlines()[0][:300]}
    return {name: float(np.abs(np.asarray(a, np.float32) - b).max()) for name, a, b in
            zip(("velocity", "new_k", "new_v"), got, reference)}


def build(path: Path, spec, out: Path, precision: str) -> dict:
    from dataclasses import replace

    from skyrt.export.engine import BuildOptions, EngineBuildError, build_engines

    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        return {"not_built": "tensorrt_rtx is not installed"}
    name = path.name.replace(".onnx", "").replace(".", "_")
    try:
        (engine,) = build_engines([replace(spec, onnx_path=path, name=name, precision=precision)], out,
                                  BuildOptions(builder="tensorrt-rtx", compute_capabilities=["8.9"]), progress=False)
    except EngineBuildError as err:
        return {"error": str(err)[:500]}
    manifest = json.loads((out / f"{name}.engine.json").read_text())
    return {"engine_bytes": manifest["engine_bytes"], "build_s": manifest["build_seconds"],
            "targets": manifest["compute_capabilities"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    import torch

    import causal_family

    causal_family.SHAPES["1.3b-width-1-layer"] = {**causal_family.SHAPES["1.3b"], "num_layers": 1, "latent": (8, 8)}
    results: dict = {"benchmark": "fp8_export", "machine": "2-core CPU, shared/loaded", "python": platform.python_version(),
                     "what": __doc__.split("\n\n")[0], "preset": PRESET, "shapes": {}}
    started = time.perf_counter()
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        results["shapes"][shape] = run_shape(shape, causal_family, torch)
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


def run_shape(shape: str, causal_family, torch) -> dict:
    """Export, quantize, measure and build the graphs of one DiT shape (module docstring)."""
    from skyrt.export.engine import graphs_from_onnx_manifest
    from skyrt.export.preset_export import export_preset_onnx
    from skyrt.export.quantize import quantize_onnx_fp8

    results: dict = {"dit": {k: v for k, v in causal_family.SHAPES[shape].items()}, "precisions": {},
                     "fp32_quantized": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = causal_family.write_random_folder(work / "model", PRESET, shape, torch.float32)
        latent = causal_family.SHAPES[shape]["latent"]
        size = dict(height=latent[0] * 8, width=latent[1] * 8)
        specs = {}
        for precision in ("fp32", "fp16", "fp8"):
            onnx_dir = work / f"onnx-{precision}"
            manifest = export_preset_onnx(folder, onnx_dir, PRESET, precision=precision, graphs=list(GRAPHS),
                                          progress=False, **size, **RING)
            spec = next(s for s in graphs_from_onnx_manifest(onnx_dir) if s.name == "dit_step")
            specs[precision] = (onnx_dir, manifest["graphs"]["dit_step"], spec)
            record = {g: {"onnx_bytes": (onnx_dir / manifest["graphs"][g]["file"]).stat().st_size,
                          **({"fp8": manifest["graphs"][g]["fp8"]} if "fp8" in manifest["graphs"][g] else {})}
                      for g in GRAPHS}
            record["dit_step"]["engine"] = build(onnx_dir / "dit_step.onnx", spec, work / "engines", precision)
            results["precisions"][precision] = record
        fp32_dir, entry, spec = specs["fp32"]
        feeds = synthetic_feeds(entry, seed=0)
        reference = session(fp32_dir / "dit_step.onnx").run(None, feeds)
        results["errors_vs_fp32_graph"] = {"reference_max_abs": {n: float(np.abs(r).max()) for n, r in
                                                                 zip(("velocity", "new_k", "new_v"), reference)}}
        for precision in ("fp16", "fp8"):
            onnx_dir, graph_entry, _ = specs[precision]
            results["errors_vs_fp32_graph"][precision] = max_error(onnx_dir / "dit_step.onnx", reference,
                                                                   as_graph_dtypes(feeds, graph_entry))
        calibration = [synthetic_feeds(entry, seed=s) for s in (1, 2, 3, 4)]
        for mode in ("weights", "weights+activations"):
            dst = work / f"dit_step.fp32-{mode.replace('+', '-')}.onnx"
            report = quantize_onnx_fp8(fp32_dir / "dit_step.onnx", dst, mode=mode,
                                       calibration=calibration if mode != "weights" else None)
            results["fp32_quantized"][mode] = {
                "onnx_bytes": dst.stat().st_size, "quantized": len(report.quantized),
                "initializer_bytes_before": report.initializer_bytes_before,
                "initializer_bytes_after": report.initializer_bytes_after,
                "error_vs_fp32_graph": max_error(dst, reference, feeds), "engine": build(dst, spec, work / "engines", "fp8")}
    return results


if __name__ == "__main__":
    sys.exit(main())
