"""TensorRT-RTX AOT engines of every causal-family preset's DiT graphs at the real Wan2.1-1.3B / 480x832 shape.

    python benchmarks/preset_engines.py --workdir /tmp/preset-engines          # everything (hours on 2 cores)
    python benchmarks/preset_engines.py --workdir W --groups self-forcing --precisions fp16 --graphs dit_step

One command reproduces the table; the options split it into jobs that each fit a time/memory slot
(results are merged into --out, one entry per group / precision / graph, written after every graph).

What is built: random weights of the real 1.3B config (dim 1536, 12 heads, 30 layers, ffn 8960, text
width 4096, text_len 512; runtime/model_config.py) in each preset's folder layout
(benchmarks/causal_family.py), exported with the shape-only trace (export_preset_onnx(trace="shapes"):
export/shape_trace.py; the same graphs as the computing trace, which at this shape would need ~17 GB
per attention call), and each graph built ahead of time with TensorRT-RTX (no GPU; engines for compute
capabilities 8.0 8.6 8.9 12.0). Presets whose graphs have the same shapes (block frames, ring slots,
blocks in flight, full-step frames) share one build ("group", named after its first preset; the
record lists its presets). cross_kv depends on no preset shape (text_len 512 for all): built once,
under the group "all-presets".

Recorded per graph: ONNX bytes (graph + external data), engine bytes, export and build seconds, the
peak RSS of each step (VmHWM, reset per step), precision, TensorRT-RTX version, machine.
FP8: the fp16 export with FP8 (E4M3) weight-only Q/DQ on its GEMM weights (quantize_onnx_fp8 of
export/quantize.py, or of --fp8-module), built for compute capabilities 8.9 and 12.0 only (TensorRT-RTX
runs FP8 on Ada and later); without a quantizer, recorded as not built.

Memory: --max-rss-gb (default 14) stops the process (exit 3, recorded) before the machine runs out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
DIT_GRAPHS = ("dit_step", "dit_step_full")
ALL_GROUP = "all-presets"  # cross_kv: no preset shape in it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="all", help="comma-separated groups (a group's first preset name) or 'all'")
    p.add_argument("--precisions", default="fp16,bf16,fp8", help="comma-separated: fp16, bf16, fp8")
    p.add_argument("--graphs", default="cross_kv,dit_step,dit_step_full")
    p.add_argument("--layers", type=int, default=30, help="DiT layers (30 = Wan2.1-1.3B)")
    p.add_argument("--height", type=int, default=None, help="pixel height (default the preset's 480)")
    p.add_argument("--width", type=int, default=None, help="pixel width (default the preset's 832)")
    p.add_argument("--max-rss-gb", type=float, default=14.0, help="stop (exit 3) past this resident memory")
    p.add_argument("--fp8-module", type=Path, default=None,
                   help="a quantize.py defining quantize_onnx_fp8 (default: skyrt.export.quantize)")
    p.add_argument("--fp8-source", default=None, help="where --fp8-module came from (recorded)")
    p.add_argument("--keep", action="store_true", help="keep the ONNX and engine files (GBs each)")
    p.add_argument("--workdir", type=Path, default=None, help="model folders, ONNX, engines (default: temp)")
    p.add_argument("--machine", default="2-core CPU, 24 GB, shared/loaded (~8 jobs), no GPU")
    p.add_argument("--out", type=Path, default=HERE / "results" / "preset_engines.json")
    return p.parse_args(argv)


def preset_groups() -> dict[str, dict]:
    """group name -> {"presets", "shape"}: presets with the same DiT graph shapes share one build."""
    from skyrt.export.preset_export import preset_profile, preset_ring
    from skyrt.runtime.causal_family import PRESETS

    groups: dict[tuple, dict] = {}
    for name, preset in PRESETS.items():
        profile = preset_profile(preset, preset_ring(preset, None, None))
        key = (profile.height, profile.width, profile.block_frames, profile.cache_blocks, profile.max_active_blocks,
               profile.full_step_frames)
        group = groups.setdefault(key, {"presets": [], "shape": dict(zip(
            ("height", "width", "block_frames", "cache_blocks", "max_active_blocks", "full_step_frames"), key))})
        group["presets"].append(name)
    return {g["presets"][0]: g for g in groups.values()}


# ------------------------------------------------------------------------------------------------
# Memory: peak RSS per step, and a stop before the shared machine runs out


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Reset VmHWM (Linux: writing 5 to clear_refs), so the next read is this step's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak is the process's so far (recorded as such: it can only be higher)


def peak_rss_gb() -> float:
    return round(_status_kb("VmHWM") / 2**20, 2)


def start_rss_guard(limit_gb: float, on_exceed) -> None:
    """A thread that calls on_exceed(rss_gb) and exits the process (3) once RSS passes limit_gb."""
    def watch():
        while True:
            rss = _status_kb("VmRSS") / 2**20
            if rss > limit_gb:
                on_exceed(rss)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True, name="rss-guard").start()


# ------------------------------------------------------------------------------------------------


def model_folder(work: Path, preset: str, layers: int) -> Path:
    """The preset's random 1.3B folder (written once per workdir; fp16 storage: half the disk, and the
    exporter loads it as fp32 like a real checkpoint)."""
    import torch

    import causal_family

    folder = work / f"model-{preset}-{layers}l"
    if (folder / ".complete").exists():
        return folder
    causal_family.SHAPES["1.3b"] = {**causal_family.SHAPES["1.3b"], "num_layers": layers}
    causal_family.write_random_folder(folder, preset, "1.3b", torch.float16, text_dim=4096)
    (folder / ".complete").write_text("")
    return folder


def onnx_bytes(onnx_dir: Path, entry: dict) -> int:
    return sum((onnx_dir / f).stat().st_size for f in entry["sha256"])


def build_one(folder: Path, work: Path, preset: str, precision: str, graph: str, size: dict, keep: bool,
              fp8=None) -> dict:
    """Export `graph` of `preset` in `precision` (shape-only trace) and build it; returns its record.
    fp8 (quantize_onnx_fp8): the fp16 export, its GEMM weights FP8 weight-only Q/DQ, built for 8.9/12.0."""
    from dataclasses import replace

    from skyrt.export.engine import BuildOptions, build_engines, graphs_from_onnx_manifest
    from skyrt.export.preset_export import export_preset_onnx
    from skyrt.runtime.causal_family import get_preset

    lora = {"lora_alpha": 4} if get_preset(preset).lora_names else {}  # causal_family.py writes a rank-4 LoRA
    onnx_dir, engine_dir = work / f"onnx-{preset}-{precision}-{graph}", work / f"engines-{preset}-{precision}"
    gc.collect()
    reset_peak_rss()
    start = time.perf_counter()
    manifest = export_preset_onnx(folder, onnx_dir, preset, precision="fp16" if fp8 else precision, graphs=[graph],
                                  progress=False, trace="shapes", ort_cpu=False, **size, **lora)
    record = {"export_s": round(time.perf_counter() - start, 1), "export_peak_rss_gb": peak_rss_gb()}
    entry = manifest["graphs"][graph]
    record.update(onnx_bytes=onnx_bytes(onnx_dir, entry), profile=entry["profile"].get("latents"),
                  inputs={i["name"]: i["shape"] for i in entry["inputs"]})
    specs = graphs_from_onnx_manifest(onnx_dir)
    options = BuildOptions(builder="tensorrt-rtx")
    if fp8 is not None:
        gc.collect()
        reset_peak_rss()
        start = time.perf_counter()
        dst = onnx_dir / f"{graph}.fp8.onnx"
        report = fp8(onnx_dir / entry["file"], dst, mode="weights")
        record.update(quantize_s=round(time.perf_counter() - start, 1), quantize_peak_rss_gb=peak_rss_gb(),
                      fp16_onnx_bytes=record["onnx_bytes"], fp8_mode="weights",
                      onnx_bytes=sum(p.stat().st_size for p in onnx_dir.glob(f"{graph}.fp8.onnx*")),
                      fp8_weights=len(report.quantized), fp8_kept=len(report.weights) - len(report.quantized),
                      initializer_bytes_before=report.initializer_bytes_before,
                      initializer_bytes_after=report.initializer_bytes_after)
        specs = [replace(s, onnx_path=dst, precision="fp8") for s in specs]
        options = replace(options, compute_capabilities=("8.9", "12.0"))  # FP8 needs Ada or later
    gc.collect()
    reset_peak_rss()
    start = time.perf_counter()
    build_engines(specs, engine_dir, options, progress=False)
    engine = json.loads((engine_dir / f"{graph}.engine.json").read_text())
    record.update(build_s=engine["build_seconds"], build_total_s=round(time.perf_counter() - start, 1),
                  build_peak_rss_gb=peak_rss_gb(), engine_bytes=engine["engine_bytes"],
                  compute_capabilities=engine["compute_capabilities"], built=True)
    if not keep:
        for path in [*onnx_dir.glob("*.onnx*"), *engine_dir.glob("*.engine")]:
            path.unlink()  # GBs each: keep the disk free for the next graph
    return record


def fp8_quantizer(module_file: Optional[Path]):
    """(quantize_onnx_fp8, None), or (None, why not): export/quantize.py's, or the one in
    `module_file` (a quantize.py from a branch not merged here; its commit goes in the record)."""
    if module_file is not None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("skyrt_fp8_quantize", module_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        return module.quantize_onnx_fp8, None
    try:
        from skyrt.export.quantize import quantize_onnx_fp8
    except ImportError as err:
        return None, f"export/quantize.py (quantize_onnx_fp8) is not on this branch: {err}"
    return quantize_onnx_fp8, None


def load_report(path: Path) -> dict:
    """The report to merge into: --out as written by this version, else a new one that keeps an older
    report (the first, 1-layer 64x64 smoke run) as "earlier_smoke"."""
    report = json.loads(path.read_text()) if path.exists() else None
    if report is not None and report.get("format") == 2:
        return report
    fresh = {"benchmark": "preset_engines", "format": 2, "results": {}}
    if report is not None:
        fresh["earlier_smoke"] = report
    return fresh


def save_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import tensorrt_rtx

    groups = preset_groups()
    wanted = list(groups) if args.groups == "all" else [g.strip() for g in args.groups.split(",")]
    unknown = [g for g in wanted if g not in groups]
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}; groups: {', '.join(groups)}")
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    size = dict(height=args.height, width=args.width)

    report = load_report(args.out)
    report["machine"] = {"description": args.machine, "platform": platform.platform(), "cpus": os.cpu_count(),
                         "tensorrt_rtx": tensorrt_rtx.__version__, "gpu": None}
    report["groups"] = groups
    report["command"] = "python benchmarks/preset_engines.py --workdir DIR  (jobs: --groups/--precisions/--graphs)"
    results = report["results"]
    current: dict = {}

    def record(group: str, precision: str, graph: str, value: dict) -> None:
        shape = "real" if args.height is None and args.width is None and args.layers == 30 else "reduced"
        value = {**value, "layers": args.layers, "shape": shape,
                 "height": args.height or 480, "width": args.width or 832, "precision": precision,
                 "tensorrt_rtx": tensorrt_rtx.__version__,
                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        results.setdefault(group, {}).setdefault(precision, {})[graph] = value
        save_report(args.out, report)
        print(group, precision, graph, json.dumps(value)[:300], flush=True)

    def exceeded(rss: float) -> None:
        if current:
            record(**current, value={"built": False, "error": f"stopped: RSS {rss:.1f} GB > --max-rss-gb "
                                                              f"{args.max_rss_gb}", "peak_rss_gb": round(rss, 2)})

    start_rss_guard(args.max_rss_gb, exceeded)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        for precision in precisions:
            fp8, why = fp8_quantizer(args.fp8_module) if precision == "fp8" else (None, None)
            if why:
                for group in wanted:
                    for graph in graphs:
                        record(group if graph in DIT_GRAPHS else ALL_GROUP, precision, graph,
                               {"built": False, "why": why})
                continue
            for group in wanted:
                for graph in graphs:
                    key = group if graph in DIT_GRAPHS else ALL_GROUP
                    if graph not in DIT_GRAPHS and results.get(ALL_GROUP, {}).get(precision, {}).get(graph, {}).get(
                            "built") and results[ALL_GROUP][precision][graph].get("layers") == args.layers:
                        continue  # cross_kv: the same graph for every group
                    folder = model_folder(work, group, args.layers)
                    current.update(group=key, precision=precision, graph=graph)
                    try:
                        value = build_one(folder, work, group, precision, graph, size, args.keep, fp8)
                        if fp8 is not None:
                            value["fp8_module"] = args.fp8_source or "export/quantize.py"
                    except Exception as err:  # record and go on: a failed build is a result too
                        value = {"built": False, "error": f"{type(err).__name__}: {err}"[:2000]}
                    if key == ALL_GROUP:
                        value["exported_from"] = group
                    record(key, precision, graph, value)
                    current.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
