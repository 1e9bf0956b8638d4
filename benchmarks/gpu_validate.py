"""Validate skyrt's GPU paths on YOUR machine: CUDA kernels, engines, and the rollout on them.

skyrt's CI has no GPU: the CUDA kernels are compiled there but never run, and TensorRT engines are
built (TensorRT-RTX) but never executed. Run this once on a machine with an NVIDIA GPU:

    pip install torch==2.13.0 -e ".[export,ort,tensorrt]"        # or .[tensorrt-rtx] on RTX GPUs
    python benchmarks/gpu_validate.py --out gpu_report.json          # tiny random model, minutes

It writes one JSON report:
  kernels  every skyrt._core.cuda kernel against its CPU reference on odd sizes (max abs diff)
  engines  builds engines from the tiny model's ONNX export with the chosen builder
  rollout  a kvcache rollout on TensorRT and on onnxruntime-CPU with the same noise: latent
           difference, per-step time on each (and with CUDA-graph replay when enabled)
  captioner a tiny random captioner on TensorRT and on onnxruntime-CPU: vision features, greedy
           tokens (must be equal), prefill / decode timings
Each section records its error instead of stopping the others, so a partial report still helps.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from skyrt.export.engine import pick_builder  # torch-free; one owner of the builder choice

# Per-kernel tolerances: fp32 elementwise math with the same formula on both sides; the CUDA
# build may contract a*b+c into FMAs (one rounding instead of two), hence a few ulps, not zero.
FP32_ATOL = 1e-5
FP16_ATOL = 2e-3  # fp16 storage: one half-precision ulp at |x| ~ 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_report.json"))
    p.add_argument("--builder", choices=("tensorrt", "tensorrt-rtx", "auto"), default="auto",
                   help="engine builder (auto: tensorrt if installed, else tensorrt-rtx)")
    p.add_argument("--sections", nargs="+", default=["kernels", "engines", "rollout", "captioner"],
                   choices=["kernels", "engines", "rollout", "captioner"])
    p.add_argument("--workdir", type=Path, default=None, help="where to keep the export and engines (default: temp)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------- kernels
def kernel_cases(rng: np.random.Generator) -> dict[str, Callable[[], dict]]:
    """name -> a check running one CUDA kernel and its CPU reference on the same odd-sized inputs."""
    return {
        "cfg_combine": lambda: _check_cfg_combine(rng),
        "kv_write_block_fp32": lambda: _check_kv_write(rng, np.float32),
        "kv_write_block_fp16": lambda: _check_kv_write(rng, np.float16),
        "kv_rope_rebase_fp32": lambda: _check_rebase(rng, np.float32),
        "kv_rope_rebase_fp16": lambda: _check_rebase(rng, np.float16),
        "flow_euler": lambda: _check_flow_euler(rng),
        "flow_unipc": lambda: _check_flow_unipc(rng),
        "addnoise_condition": lambda: _check_addnoise(rng),
    }


def run_kernels(seed: int) -> dict:
    from skyrt import _core

    if not _core.cuda.available():
        return {"error": "this skyrt build has no CUDA kernels: reinstall with the CUDA toolkit on PATH "
                         "(pip install -e . -Ccmake.define.SKYRT_CUDA=ON)"}
    results = {}
    for name, case in kernel_cases(np.random.default_rng(seed)).items():
        results[name] = _guarded(case)
    results["all_passed"] = all(r.get("passed") for r in results.values() if isinstance(r, dict))
    return results


def _result(diff: float, atol: float, **extra) -> dict:
    return {"max_abs_diff": float(diff), "atol": atol, "passed": bool(diff <= atol), **extra}


def _check_cfg_combine(rng) -> dict:
    from skyrt import _core
    from skyrt.runtime.cuda_mem import DeviceArray

    n = 16 * 3 * 7 * 9 + 5
    cond, uncond = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    want = np.empty_like(cond)
    _core.cfg_combine(cond, uncond, want, 5.5)
    d_cond, d_uncond, d_out = DeviceArray.from_host(cond), DeviceArray.from_host(uncond), DeviceArray.empty((n,), np.float32)
    _core.cuda.cfg_combine(d_cond.ptr, d_uncond.ptr, d_out.ptr, n, 5.5, 0)
    return _result(np.abs(d_out.download() - want).max(), FP32_ATOL, size=n)


def _check_kv_write(rng, dtype) -> dict:
    from skyrt import _core
    from skyrt.runtime.cuda_mem import DeviceArray

    layers, slots, tokens, heads, head_dim = 3, 5, 7, 2, 24
    cache = rng.standard_normal((layers, slots, tokens, heads, head_dim)).astype(dtype)
    src = rng.standard_normal((layers, tokens, heads, head_dim)).astype(dtype)
    d_cache, d_src = DeviceArray.from_host(cache), DeviceArray.from_host(src)
    block = tokens * heads * head_dim
    _core.cuda.kv_write_block(d_src.ptr, block, d_cache.ptr, slots * block, block, 3, layers, block,
                              "float16" if dtype == np.float16 else "float32", 0)
    _core.kv_write_block(cache, 3, src)
    return _result(np.abs(d_cache.download().astype(np.float32) - cache.astype(np.float32)).max(), 0.0)


def _check_rebase(rng, dtype) -> dict:
    from skyrt import _core
    from skyrt.runtime.cuda_mem import DeviceArray

    shape = (2, 3, 5, 2, 36)  # head_dim 36: temporal part 36 - 4 * 6 = 12
    keys = rng.standard_normal(shape).astype(dtype)
    d_keys = DeviceArray.from_host(keys)
    layers, slots, tokens, heads, head_dim = shape
    strides = [s // keys.itemsize for s in keys.strides]
    _core.cuda.kv_rope_rebase(d_keys.ptr, layers, slots, tokens, heads, head_dim, strides[0], strides[1], strides[2],
                              strides[3], 37, 10000.0, "float16" if dtype == np.float16 else "float32", 0)
    _core.kv_rope_rebase(keys, 37)
    atol = FP16_ATOL if dtype == np.float16 else FP32_ATOL
    return _result(np.abs(d_keys.download().astype(np.float32) - keys.astype(np.float32)).max(), atol)


def _check_flow_euler(rng) -> dict:
    from skyrt import _core
    from skyrt.runtime.cuda_mem import DeviceArray

    outer, frames, inner = 3, 5, 7 * 11
    x, v = (rng.standard_normal((outer, frames, inner)).astype(np.float32) for _ in range(2))
    dt = rng.uniform(-0.2, 0, frames).astype(np.float32)
    update = np.array([True, False, True, True, False])
    want = np.empty_like(x)
    _core.flow_euler(x, v, want, dt, update)
    d = [DeviceArray.from_host(a) for a in (x, v, dt, update.astype(np.uint8))]
    d_out = DeviceArray.empty(x.shape, np.float32)
    _core.cuda.flow_euler(d[0].ptr, d[1].ptr, d_out.ptr, d[2].ptr, d[3].ptr, outer, frames, inner, 0)
    return _result(np.abs(d_out.download() - want).max(), FP32_ATOL)


def _check_flow_unipc(rng) -> dict:
    """Three consecutive steps (order 1, then 2) so the per-frame history buffers are exercised."""
    from skyrt import _core
    from skyrt.runtime.cuda_mem import DeviceArray
    from skyrt.runtime.scheduler import shifted_sigmas

    outer, frames, inner = 2, 3, 5 * 13
    sigmas = np.asarray(shifted_sigmas(10, 8.0), np.float64)
    x = rng.standard_normal((outer, frames, inner)).astype(np.float32)
    hist = [np.zeros_like(x) for _ in range(3)]
    d_x = DeviceArray.from_host(x)
    d_hist = [DeviceArray.from_host(h) for h in hist]
    worst = 0.0
    for step in range(3):
        v = rng.standard_normal(x.shape).astype(np.float32)
        coeffs = _core.unipc_frame_coeffs(sigmas, np.array([step, step + 1, -1 if step == 0 else step], np.int64))
        _core.flow_unipc(x, v, x, *hist, coeffs)
        d_v, d_coeffs = DeviceArray.from_host(v), DeviceArray.from_host(coeffs)
        _core.cuda.flow_unipc(d_x.ptr, d_v.ptr, d_x.ptr, *(h.ptr for h in d_hist), d_coeffs.ptr, outer, frames, inner, 0)
        worst = max(worst, float(np.abs(d_x.download() - x).max()))
    return _result(worst, 1e-4, steps=3)


def _check_addnoise(rng) -> dict:
    from skyrt import _core
    from skyrt.runtime.cuda_mem import DeviceArray

    outer, frames, inner = 4, 6, 9 * 5
    x, noise = (rng.standard_normal((outer, frames, inner)).astype(np.float32) for _ in range(2))
    want = np.empty_like(x)
    _core.addnoise_condition(x, noise, want, 0.02, 1, 4)
    d_x, d_noise, d_out = DeviceArray.from_host(x), DeviceArray.from_host(noise), DeviceArray.empty(x.shape, np.float32)
    _core.cuda.addnoise_condition(d_x.ptr, d_noise.ptr, d_out.ptr, outer, frames, inner, 1, 4, 0.02, 0)
    return _result(np.abs(d_out.download() - want).max(), FP32_ATOL)


# ------------------------------------------------------------------------------- engines, rollout
def run_engines_and_rollout(args, workdir: Path, sections: list[str]) -> dict:
    """Export the tiny model, build engines, then compare a TensorRT rollout with ORT-CPU."""
    from skyrt.export.tiny import ensure_default_model

    report: dict = {}
    model_dir = ensure_default_model()
    onnx_dir, engine_dir = workdir / "onnx", workdir / "engines"
    builder = pick_builder(args.builder)
    report["engines"] = _guarded(lambda: _build(model_dir, onnx_dir, engine_dir, builder))
    if "rollout" in sections:
        report["rollout"] = _guarded(lambda: _compare_rollouts(onnx_dir, engine_dir, args.seed))
    return report


def _build(model_dir: Path, onnx_dir: Path, engine_dir: Path, builder: str) -> dict:
    from skyrt.export.engine import BuildOptions, build_engines, graphs_from_onnx_manifest
    from skyrt.export.onnx_export import export_onnx

    started = time.perf_counter()
    export_onnx(model_dir, onnx_dir)
    exported = time.perf_counter()
    paths = build_engines(graphs_from_onnx_manifest(onnx_dir), engine_dir, BuildOptions(builder=builder))
    return {"builder": builder, "engines": [p.name for p in paths], "export_s": exported - started,
            "build_s": time.perf_counter() - exported, "passed": True}


def _compare_rollouts(onnx_dir: Path, engine_dir: Path, seed: int) -> dict:
    import skyrt

    settings = dict(mode="kvcache", ar_step=2, causal_block_size=1, sink_blocks=1, window_blocks=4, height=64,
                    width=64, num_inference_steps=4, guidance_scale=5.0, seed=seed, output="latent", max_chunks=12)
    timings, latents = {}, {}
    for name, path, backend in (("onnxruntime_cpu", onnx_dir, "onnxruntime"), ("tensorrt", engine_dir, "tensorrt")):
        pipe = skyrt.load(path, backend=backend)
        started = time.perf_counter()
        latents[name] = np.concatenate(list(pipe.stream("a red circle bouncing", **settings)), axis=1)
        timings[name] = time.perf_counter() - started
    diff = float(np.abs(latents["tensorrt"] - latents["onnxruntime_cpu"]).max())
    # fp32 engines: TF32-free strongly typed fp32 math, but different kernels and summation order.
    return {"max_abs_latent_diff": diff, "atol": 1e-3, "passed": diff <= 1e-3, "seconds": timings,
            "blocks": settings["max_chunks"], "settings": settings}


# ------------------------------------------------------------------------------- captioner
CAPTIONER_VISION_ATOL = 1e-3  # fp32 engines: other kernels and summation order than ORT-CPU


def run_captioner(workdir: Path, builder: str, new_tokens: int = 24) -> dict:
    """A tiny random Qwen2.5-VL captioner exported, built and run on TensorRT and on ORT-CPU with the
    same frames: vision features within CAPTIONER_VISION_ATOL, greedy tokens equal, timings."""
    from skyrt.export.captioner.tiny import write_tiny_captioner
    from skyrt.runtime.captioner import open_captioner, preprocess_video, vision_inputs

    checkpoint = write_tiny_captioner(workdir / "captioner")
    cache = workdir / "captioner-cache"
    captioners = {"onnxruntime_cpu": open_captioner(checkpoint, cache_dir=cache, progress=False),
                  "tensorrt": open_captioner(checkpoint, backend="tensorrt", cache_dir=cache, progress=False,
                                             builder=builder)}
    height, width = captioners["onnxruntime_cpu"].manifest["export_config"]["frame_size"]
    frames = _smooth_frames(16, height, width)
    features, results = {}, {}
    for name, cap in captioners.items():
        pixels, grid = preprocess_video(frames, cap.config.preprocess)
        features[name] = cap.backend.vision(vision_inputs(pixels, [grid], cap.config, cap.vision_dtype))
        cap.generate_frames(frames, max_new_tokens=new_tokens)  # warm-up: first-call allocations out of the timings
        results[name] = cap.generate_frames(frames, max_new_tokens=new_tokens)
    diff = float(np.abs(features["tensorrt"].astype(np.float32) - features["onnxruntime_cpu"]).max())
    tokens = {n: r.tokens for n, r in results.items()}
    return {"builder": builder, "vision_max_abs_diff": diff, "vision_atol": CAPTIONER_VISION_ATOL,
            "tokens_equal": tokens["tensorrt"] == tokens["onnxruntime_cpu"],
            "first_token_difference": first_difference(tokens["tensorrt"], tokens["onnxruntime_cpu"]),
            "tokens": tokens, "timings": {n: _per_token(r.timings) for n, r in results.items()},
            "passed": diff <= CAPTIONER_VISION_ATOL and tokens["tensorrt"] == tokens["onnxruntime_cpu"]}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two greedy sequences part (None when equal): a difference
    late in a sequence of a random model is more likely a near-tie than a broken engine."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _per_token(timings: dict) -> dict:
    """The captioner's timings plus milliseconds per decoded token."""
    steps = timings.get("decode_steps") or 0
    return {**timings, "decode_ms_per_token": 1e3 * timings["decode_s"] / steps if steps else None}


def _smooth_frames(count: int, height: int, width: int) -> np.ndarray:
    """uint8 [count, height, width, 3] moving gradients: deterministic and not degenerate."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x + 7 * t) % 256, (y + 3 * t) % 256, (x + y) % 256], axis=-1)
                     for t in range(count)]).astype(np.uint8)


def _guarded(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as err:  # the report records it; the other sections still run
        return {"passed": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


def machine_info() -> dict:
    from skyrt.runtime import cuda_mem

    info = {"platform": platform.platform(), "python": sys.version.split()[0]}
    if cuda_mem.device_count():
        info["compute_capability"] = cuda_mem.compute_capability()
    info["gpus"] = cuda_mem.device_count()
    return info


def main(argv=None) -> int:
    import tempfile

    args = parse_args(argv)
    report = {"benchmark": "gpu_validate", "machine": _guarded(machine_info)}
    if "kernels" in args.sections:
        report["kernels"] = _guarded(lambda: run_kernels(args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        if {"engines", "rollout"} & set(args.sections):
            report |= run_engines_and_rollout(args, workdir, args.sections)
        if "captioner" in args.sections:
            report["captioner"] = _guarded(lambda: run_captioner(workdir, pick_builder(args.builder)))
    args.out.write_text(json.dumps(report, indent=2, default=str))
    passed = [report[s].get("passed", report[s].get("all_passed")) for s in args.sections if s in report]
    print(json.dumps({s: report[s].get("passed", report[s].get("all_passed")) for s in args.sections if s in report}))
    print(f"wrote {args.out}")
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
