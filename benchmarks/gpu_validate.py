"""Validate skyrt's GPU paths on YOUR machine: CUDA kernels, the rollout core, engines, throughput.

skyrt's CI has no GPU: the CUDA kernels are compiled there but never run, and TensorRT engines are
built (TensorRT-RTX) but never executed. Run this once on a machine with an NVIDIA GPU.

Full mode (TensorRT and onnxruntime installed):

    pip install torch==2.13.0 -e ".[export,ort,tensorrt]"        # or .[tensorrt-rtx] on RTX GPUs
    python benchmarks/gpu_validate.py --out gpu_report.json          # tiny random model, minutes

  kernels  every skyrt._core.cuda kernel against its CPU reference on odd sizes (max abs diff)
  engines  builds engines from the tiny model's ONNX export with the chosen builder
  rollout  a kvcache rollout on TensorRT and on onnxruntime-CPU with the same noise: latent
           difference, per-step time on each
  captioner a tiny random captioner on TensorRT and on onnxruntime-CPU: vision features, greedy
           tokens (must be equal), prefill / decode timings

Torch-only mode: a machine with torch (CUDA), nvcc, cmake, nanobind and scikit-build-core, and no
TensorRT, no onnxruntime-gpu, no network. One command from the repository root builds the extension
offline and runs everything (under 6 minutes on a Hopper GPU by design: seconds for the kernels and
the rollout, about a minute of DF-1.3B blocks, the rest is the build):

    python benchmarks/gpu_validate.py --mode torch-only --build --out benchmarks/results/gpu_validate_torch.json

  build          pip install --no-build-isolation --no-deps -e . (seconds, status, CUDA compiled in)
  kernels        as above
  torch_rollout  the KV-cached rollout with its state in the rollout core on the GPU (torch-CUDA DiT
                 step on the core's buffers) against the same rollout on the CPU, same noise: a small
                 random DiT with the fps embedding, CFG (batch 2), blocks of 1 and 2, ring eviction
                 and RoPE rebases; max latent difference
  throughput     the real DF-1.3B architecture (30 layers, dim 1536) with random bf16 weights, 4
                 steps, blocks of 3 latent frames, a 21-frame KV context (1 sink + 6 window blocks),
                 no CFG, at 480x832 and 544x960: ms per block (4 denoising rows + the commit pass),
                 pixel frames per second of the DiT (12 per block; the VAE decode is timed apart),
                 peak memory, and the achieved share of the GPU's bf16 matmul peak measured in the
                 same run (model FLOPs counted from the shapes, see forward_flops)
  causal_family  the Self-Forcing preset's stream (its own few-step sampler, blocks of 3, KV cache,
                 streaming VAE decode) at Wan2.1-1.3B's real shape, 480x832, random bf16 weights in
                 its release layout (benchmarks/causal_family.py): ms per block, video fps.
                 Anchors: Self-Forcing reports 17 fps on one H100, FlashDreams ~35 fps
  preset_cuda_graphs  the Self-Forcing preset's stream on torch-CUDA three ways, same noise: the default
                 step (gather of the valid ring slots), the fixed-shape step eager (whole ring, additive
                 mask, static buffers) and the fixed-shape step through one CUDA graph per step shape
                 (TorchBackend(cuda_graphs=True)); a small fp32 model (equality: fixed vs gather, graphs vs
                 eager) and Wan2.1-1.3B's real shape in bf16 at 480x832 (ms per block and video fps of each,
                 graphs / eager ratio, torch allocations after warm-up, captures and replays per key),
                 a prompt switch with LongLive's recache included
  tiny_decoder   TAEHV's tiny decoder (random weights, export/tiny_vae.py) on the GPU against the CPU on
                 the same latents (max difference, fp32) and its streaming decode time per latent frame
                 at 480x832 in fp32 and fp16
  memory_per_precision  the Self-Forcing preset's stream at 480x832 in fp32, fp16 and bf16 (random weights
                 at Wan2.1-1.3B's shape, a recache included): torch's peak allocation and the rollout core's
                 buffers against runtime/memory_plan.py's computed weights, cache and activations
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


def pick_builder(name: str) -> str:
    """skyrt.export.engine.pick_builder (torch-free; one owner of the builder choice), imported late
    so that --build can make skyrt importable first."""
    from skyrt.export.engine import pick_builder as pick

    return pick(name)

# Per-kernel tolerances: fp32 elementwise math with the same formula on both sides; the CUDA
# build may contract a*b+c into FMAs (one rounding instead of two), hence a few ulps, not zero.
FP32_ATOL = 1e-5
FP16_ATOL = 2e-3  # fp16 storage: one half-precision ulp at |x| ~ 2


FULL_SECTIONS = ["kernels", "engines", "rollout", "captioner"]
TORCH_ONLY_SECTIONS = ["kernels", "torch_rollout", "throughput", "causal_family", "preset_cuda_graphs",
                       "tiny_decoder", "memory_per_precision"]
BUILD_COMMAND = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_report.json"))
    p.add_argument("--mode", choices=("full", "torch-only"), default="full",
                   help="full: TensorRT and onnxruntime sections; torch-only: kernels, torch rollout, throughput")
    p.add_argument("--build", action="store_true",
                   help="first build the extension offline: " + " ".join(BUILD_COMMAND[2:]))
    p.add_argument("--builder", choices=("tensorrt", "tensorrt-rtx", "auto"), default="auto",
                   help="engine builder (auto: tensorrt if installed, else tensorrt-rtx)")
    p.add_argument("--sections", nargs="+", default=None, choices=FULL_SECTIONS + TORCH_ONLY_SECTIONS[1:],
                   help="default: every section of the mode")
    p.add_argument("--sizes", nargs="+", default=["480x832", "544x960"], help="throughput frame sizes HxW")
    p.add_argument("--workdir", type=Path, default=None, help="where to keep the export and engines (default: temp)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.sections is None:
        args.sections = TORCH_ONLY_SECTIONS if args.mode == "torch-only" else FULL_SECTIONS
    return args


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
        "flow_unipc": lambda: _check_flow_unipc(rng, official_df_aliasing=False),
        "flow_unipc_official_df_aliasing": lambda: _check_flow_unipc(rng, official_df_aliasing=True),
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


DEVICE = "cuda:0"


def _to_device(array: np.ndarray):
    """A skyrt._core.Buffer on the GPU holding a copy of `array` (the core allocates and counts it)."""
    from skyrt import _core

    array = np.ascontiguousarray(array)
    dtype = "uint8" if array.dtype == np.bool_ else str(array.dtype)
    buf = _core.Buffer.allocate(list(array.shape), dtype, DEVICE, False)
    _core.upload(buf, array.view(np.uint8) if array.dtype == np.bool_ else array)
    return buf


def _empty(shape, dtype=np.float32):
    from skyrt import _core

    return _core.Buffer.allocate(list(shape), np.dtype(dtype).name, DEVICE, False)


def _to_host(buf) -> np.ndarray:
    from skyrt import _core

    out = np.empty(tuple(buf.shape), np.dtype(buf.dtype))
    _core.download(buf, out)
    return out


def _check_cfg_combine(rng) -> dict:
    from skyrt import _core

    n = 16 * 3 * 7 * 9 + 5
    cond, uncond = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    want = np.empty_like(cond)
    _core.cfg_combine(cond, uncond, want, 5.5)
    d_out = _empty((n,))
    _core.cuda.cfg_combine(_to_device(cond), _to_device(uncond), d_out, 5.5)
    return _result(np.abs(_to_host(d_out) - want).max(), FP32_ATOL, size=n)


def _check_kv_write(rng, dtype) -> dict:
    from skyrt import _core

    layers, slots, tokens, heads, head_dim = 3, 5, 7, 2, 24
    cache = rng.standard_normal((layers, slots, tokens, heads, head_dim)).astype(dtype)
    src = rng.standard_normal((layers, tokens, heads, head_dim)).astype(dtype)
    d_cache = _to_device(cache)
    _core.cuda.kv_write_block(d_cache, 3, _to_device(src))
    _core.kv_write_block(cache, 3, src)
    return _result(np.abs(_to_host(d_cache).astype(np.float32) - cache.astype(np.float32)).max(), 0.0)


def _check_rebase(rng, dtype) -> dict:
    from skyrt import _core

    shape = (2, 3, 5, 2, 36)  # head_dim 36: temporal part 36 - 4 * 6 = 12
    keys = rng.standard_normal(shape).astype(dtype)
    d_keys = _to_device(keys)
    _core.cuda.kv_rope_rebase(d_keys, 37)
    _core.kv_rope_rebase(keys, 37)
    atol = FP16_ATOL if dtype == np.float16 else FP32_ATOL
    return _result(np.abs(_to_host(d_keys).astype(np.float32) - keys.astype(np.float32)).max(), atol)


def _check_flow_euler(rng) -> dict:
    from skyrt import _core

    outer, frames, inner = 3, 5, 7 * 11
    x, v = (rng.standard_normal((outer, frames, inner)).astype(np.float32) for _ in range(2))
    dt = rng.uniform(-0.2, 0, frames).astype(np.float32)
    update = np.array([True, False, True, True, False])
    want = np.empty_like(x)
    _core.flow_euler(x, v, want, dt, update)
    d_out = _empty(x.shape)
    _core.cuda.flow_euler(_to_device(x), _to_device(v), d_out, _to_device(dt), _to_device(update))
    return _result(np.abs(_to_host(d_out) - want).max(), FP32_ATOL)


def _check_flow_unipc(rng, official_df_aliasing: bool) -> dict:
    """Three consecutive steps (order 1, then 2) so the per-frame history buffers are exercised."""
    from skyrt import _core
    from skyrt.runtime.scheduler import shifted_sigmas

    outer, frames, inner = 2, 3, 5 * 13
    sigmas = np.asarray(shifted_sigmas(10, 8.0), np.float64)
    x = rng.standard_normal((outer, frames, inner)).astype(np.float32)
    hist = [np.zeros_like(x) for _ in range(3)]
    d_x = _to_device(x)
    d_hist = [_to_device(h) for h in hist]
    worst = 0.0
    for step in range(3):
        v = rng.standard_normal(x.shape).astype(np.float32)
        coeffs = _core.unipc_frame_coeffs(sigmas, np.array([step, step + 1, -1 if step == 0 else step], np.int64))
        _core.flow_unipc(x, v, x, *hist, coeffs, official_df_aliasing=official_df_aliasing)
        _core.cuda.flow_unipc(d_x, _to_device(v), d_x, *d_hist, _to_device(coeffs),
                              official_df_aliasing=official_df_aliasing)
        worst = max(worst, float(np.abs(_to_host(d_x) - x).max()))
    return _result(worst, 1e-4, steps=3)


def _check_addnoise(rng) -> dict:
    from skyrt import _core

    outer, frames, inner = 4, 6, 9 * 5
    x, noise = (rng.standard_normal((outer, frames, inner)).astype(np.float32) for _ in range(2))
    want = np.empty_like(x)
    _core.addnoise_condition(x, noise, want, 0.02, 1, 4)
    d_out = _empty(x.shape)
    _core.cuda.addnoise_condition(_to_device(x), _to_device(noise), d_out, 0.02, 1, 4)
    return _result(np.abs(_to_host(d_out) - want).max(), FP32_ATOL)


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


# ------------------------------------------------------------------------------- torch-only mode
def run_build(repo: Path) -> dict:
    """The offline build of the extension (no network: --no-build-isolation uses the installed
    scikit-build-core and nanobind), then what it contains."""
    import subprocess

    started = time.perf_counter()
    result = subprocess.run(BUILD_COMMAND, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    report = {"command": " ".join(BUILD_COMMAND[2:]), "seconds": time.perf_counter() - started,
              "returncode": result.returncode, "output_tail": result.stdout[-3000:]}
    if result.returncode == 0:
        from skyrt import _core

        report["build_info"] = dict(_core.build_info())
    report["passed"] = result.returncode == 0 and report.get("build_info", {}).get("cuda") is True
    return report


TORCH_ROLLOUT_ATOL = 1e-3  # fp32 on both devices (TF32 off); summation order differs, CFG 5 amplifies it
ROLLOUT_CASES = {  # name: (request overrides, blocks, RoPE table) - the table shrunk so rebases happen
    "guided_blocks_of_1_evict_rebase": (dict(ar_step=1, causal_block_size=1, guidance_scale=5.0), 12, 24),
    "blocks_of_2_euler": (dict(ar_step=2, causal_block_size=2, sampler="euler"), 6, 1024),
}


def run_torch_rollout(seed: int, device: str = DEVICE) -> dict:
    """The same KV-cached rollout with its state on the GPU (rollout core on cuda:0, torch-CUDA DiT
    step on the core's buffers) and on the CPU: a small random DiT with the fps embedding, CFG as
    one batch of 2, ring eviction and RoPE rebases; the noise comes from one numpy generator."""
    import torch

    require_torch_device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding is a Conv3d
    from skyrt.export.dit import WanDiT
    from skyrt.runtime.model_config import DiTConfig

    cfg = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, text_len=16,
                    inject_sample_info=True)
    torch.manual_seed(seed)
    dit = WanDiT(cfg).eval()
    contexts = [torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(seed + i))
                for i in range(2)]
    report = {}
    for name, (overrides, blocks, table) in ROLLOUT_CASES.items():
        def case(overrides=overrides, blocks=blocks, table=table) -> dict:
            got = {}
            timings = {}
            for where in ("cpu", device):
                started = time.perf_counter()
                got[where] = _rollout_blocks(dit, contexts, where, overrides, blocks, table, seed)
                timings[where] = time.perf_counter() - started
            diff = float(np.abs(got[device] - got["cpu"]).max())
            return {**_result(diff, TORCH_ROLLOUT_ATOL), "blocks": blocks, "seconds": timings,
                    "latent_std": float(got["cpu"].std()), "settings": overrides, "rope_table": table}
        report[name] = _guarded(case)
    report["passed"] = all(r.get("passed") for r in report.values())
    return report


def _rollout_blocks(dit, contexts, device: str, overrides: dict, blocks: int, table: int, seed: int) -> np.ndarray:
    """The first `blocks` clean latent blocks [16, F, h, w] of a kvcache rollout on `device`."""
    import copy

    import torch

    from skyrt.runtime import kvcache
    from skyrt.runtime.backends.base import TextContext
    from skyrt.export.torch_backend import TorchBackend
    from skyrt.runtime.pipeline import Pipeline

    backend = TorchBackend.from_modules(copy.deepcopy(dit), device=device)
    req = Pipeline(backend)._request(dict(prompt="random", num_frames=1 + 4 * 2**40, height=64, width=64,
                                          num_inference_steps=4, shift=8.0, mode="kvcache", causal_attention=True,
                                          sink_blocks=1, window_blocks=3, fps=24, seed=seed, **overrides))
    cond, uncond = (TextContext(f"context {i}", c.to(device)) for i, c in enumerate(contexts))
    saved, kvcache.ROPE_TABLE = kvcache.ROPE_TABLE, table
    try:
        rollout = kvcache.KVRollout(backend, req, cond, uncond if req.use_cfg else None,
                                    np.random.default_rng(seed), kvcache.KVSettings(1, 3))
        with rollout, torch.inference_mode():
            assert rollout.core.device == device, f"the stream's state is on {rollout.core.device}, not {device}"
            out = []
            for block in rollout.blocks():
                out.append(np.array(block))
                if len(out) == blocks:
                    break
    finally:
        kvcache.ROPE_TABLE = saved
    return np.concatenate(out, axis=1)


# DF-1.3B throughput ------------------------------------------------------------------------------
THROUGHPUT = dict(num_inference_steps=4, block_frames=3, context_frames=21, warmup_blocks=7, measured_blocks=4)


def forward_flops(cfg, active_tokens: int, cached_tokens: int, text_tokens: int) -> float:
    """FLOPs of one DiT step over `active_tokens` against `cached_tokens` (matmuls only, 2 per
    multiply-add): per layer the q, k, v, o projections (4 L d^2), the cross-attention q and o (2 L d^2;
    its K/V are per prompt), the FFN (2 L d ffn), self-attention scores and values over the cache and
    the active tokens (2 L (S + L) d) and cross-attention over the text (2 L Lt d)."""
    d, f, L, S = cfg.dim, cfg.ffn_dim, active_tokens, cached_tokens
    per_layer = 6 * L * d * d + 2 * L * d * f + 2 * L * (S + L) * d + 2 * L * text_tokens * d
    return 2.0 * cfg.num_layers * per_layer


def require_torch_device(device: str) -> None:
    """Stop a torch section at once, with the reason, when torch cannot reach `device` (before any
    CPU-side half of a comparison spends minutes)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device for {device} (torch.cuda.is_available() "
                           "is False): run the torch-only mode with a CUDA build of torch on a machine with an "
                           "NVIDIA GPU")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure_bf16_peak(n: int = 8192, iters: int = 30, device: str = DEVICE) -> float:
    """TFLOP/s of a square bf16 matmul on this GPU (cuBLAS), the yardstick for the model's share."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2.0 * n**3 * iters / (time.perf_counter() - started) / 1e12


def run_throughput(seed: int, sizes: list[str], device: str = DEVICE, config=None, peak_n: int = 8192) -> dict:
    """The real DF-1.3B architecture (or `config`), random bf16 weights, on the KV-cached rollout
    (module docstring). device / config / peak_n exist so the tests can run the same code on a CPU."""
    import torch

    from skyrt.export.dit import WanDiT
    from skyrt.export.torch_backend import TorchBackend
    from skyrt.runtime.model_config import DF_1_3B_540P

    require_torch_device(device)
    config = config or DF_1_3B_540P
    torch.manual_seed(seed)
    with torch.device(device):
        dit = WanDiT(config)
    backend = TorchBackend.from_modules(dit.to(torch.bfloat16), device=device, dtype=torch.bfloat16)
    report = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
              "bf16_matmul_tflops": measure_bf16_peak(peak_n, device=device),
              "settings": {**THROUGHPUT, "guidance": "none (one context)", "dtype": "bfloat16",
                           "kv_dtype": "float16", "layers": config.num_layers, "dim": config.dim}}
    for size in sizes:
        height, width = (int(v) for v in size.lower().split("x"))
        report[size] = _guarded(lambda: _throughput_at(backend, height, width, report["bf16_matmul_tflops"], seed))
    report["passed"] = all(report[s].get("passed") for s in sizes)
    return report


def _throughput_at(backend, height: int, width: int, peak_tflops: float, seed: int) -> dict:
    import torch

    from skyrt import _core
    from skyrt.runtime import kvcache
    from skyrt.runtime.backends.base import TextContext
    from skyrt.runtime.pipeline import Pipeline

    t, device = THROUGHPUT, backend.device
    cfg, block = backend.dit.config, t["block_frames"]
    cuda = device.type == "cuda"
    window = t["context_frames"] // block - 1
    req = Pipeline(backend)._request(dict(
        prompt="random", num_frames=1 + 4 * 2**40, height=height, width=width, mode="kvcache",
        causal_attention=True, num_inference_steps=t["num_inference_steps"], shift=5.0, guidance_scale=1.0,
        ar_step=t["num_inference_steps"], causal_block_size=block, sink_blocks=1, window_blocks=window, fps=24,
        seed=seed))
    context = TextContext("random", torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=torch.bfloat16))
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rollout = kvcache.KVRollout(backend, req, context, None, np.random.default_rng(seed), kvcache.KVSettings(1, window))
    times = []
    with rollout, torch.inference_mode():
        blocks = rollout.blocks()
        for _ in range(t["warmup_blocks"] + t["measured_blocks"]):
            started = time.perf_counter()
            next(blocks)  # the block's clean latents come back to the host: the GPU work is done
            times.append(time.perf_counter() - started)
        core_bytes = _core.memory_stats()["live_bytes"]
    measured = times[t["warmup_blocks"]:]
    ms = 1e3 * float(np.median(measured))
    tokens_per_frame = (height // 16) * (width // 16)
    active, cached = block * tokens_per_frame, t["context_frames"] * tokens_per_frame
    flops = (t["num_inference_steps"] + 1) * forward_flops(cfg, active, cached, cfg.text_len)
    achieved = flops / (ms / 1e3) / 1e12
    result = {"ms_per_block": ms, "ms_per_block_all": [1e3 * x for x in times],
              "pixel_fps": 4 * block / (ms / 1e3), "latent_frames_per_block": block,
              "dit_tflops": achieved, "share_of_bf16_matmul_peak": achieved / peak_tflops,
              "flops_per_block": flops, "core_buffers_gib": core_bytes / 2**30,
              "torch_peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
              "passed": bool(np.isfinite(ms))}
    result["vae_decode"] = _guarded(lambda: _vae_decode_time(height, width, block, str(device)))
    return result


def _vae_decode_time(height: int, width: int, latent_frames: int, device: str, dim: int = 96) -> dict:
    """The Wan2.1 VAE (random fp32 weights) streaming-decoding one block, per latent frame."""
    import torch

    from skyrt.export.vae import StreamingDecoder, VAEConfig, WanVAE

    with torch.device(device):
        vae = WanVAE(VAEConfig(dim=dim)).eval()
    decoder = StreamingDecoder(vae)
    z = torch.randn(1, 16, 1, height // 8, width // 8, device=device)
    with torch.inference_mode():
        for _ in range(2):  # the first frame and one later frame as warm-up
            decoder.decode_next(z)
        _sync(device)
        started = time.perf_counter()
        for _ in range(latent_frames):
            decoder.decode_next(z)
        _sync(device)
    ms = 1e3 * (time.perf_counter() - started)
    del vae, decoder
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"ms_per_block": ms, "pixel_fps": 4 * latent_frames / (ms / 1e3), "passed": True}


# ------------------------------------------------------------------------------------------------
def run_causal_family(device: str = DEVICE, shape: str = "1.3b", blocks: int = 8) -> dict:
    """benchmarks/causal_family.py's Self-Forcing stream on `device` (bf16 there; fp32 on the CPU)."""
    import importlib.util
    import tempfile

    import torch

    require_torch_device(device)
    spec = importlib.util.spec_from_file_location("causal_family_bench", Path(__file__).with_name("causal_family.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    args = bench.parse_args(["--shape", shape, "--device", device, "--dtype", dtype, "--blocks", str(blocks)])
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        folder = Path(tmp) / f"{args.preset}-{shape}"
        folder.mkdir()
        bench.write_random_folder(folder, args.preset, shape, getattr(torch, dtype))
        result = bench.measure(folder, args)
    return dict(result, preset=args.preset, shape=shape, dtype=dtype, passed=True,
                anchors_video_fps={"self_forcing_h100": 17, "flashdreams": 35})


# ------------------------------------------------------------------------------------------------
# The preset's torch-CUDA stream with CUDA graphs, the tiny decoder, memory per precision

GRAPH_PRESET = "self-forcing"
GRAPH_STREAM = dict(blocks=6, switch_at=3, warmup_blocks=2)  # a prompt switch with recache at block 3
# fixed vs gather: fp32 summation order only; graphs vs eager fixed: the same kernels replayed
FIXED_VS_GATHER_ATOL, GRAPHS_VS_EAGER_ATOL = 1e-4, 1e-5
SMALL_GRAPH_CONFIG = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, text_len=32)


def _preset_backend(config, device: str, dtype, seed: int, **options):
    """A TorchBackend over a random WanDiT of `config` in `dtype`, built on `device` (no model folder)."""
    import torch

    from skyrt.export.dit import WanDiT
    from skyrt.export.torch_backend import TorchBackend

    torch.manual_seed(seed)
    with torch.device(device):
        dit = WanDiT(config)
    return TorchBackend.from_modules(dit.to(dtype), device=device, dtype=dtype, **options)


def _preset_stream(backend, height: int, width: int, blocks: int, switch_at: int | None, seed: int,
                   text_len: int) -> tuple[np.ndarray, list[float], dict]:
    """`blocks` clean latent blocks of the preset's stream (random prompt contexts, one prompt switch with
    recache at block `switch_at`), the seconds per block, and torch's allocation count and the core's
    live bytes after each block."""
    import torch

    from skyrt import _core
    from skyrt.runtime.backends.base import TextContext
    from skyrt.runtime.causal_family import PRESETS
    from skyrt.runtime.pipeline import Pipeline

    cfg, device = backend.dit.config, backend.device
    contexts = {}

    def encode(prompt):  # umT5 stand-in: a seeded random context per prompt
        if prompt not in contexts:
            g = torch.Generator().manual_seed(seed + len(contexts))
            contexts[prompt] = torch.randn(1, text_len, cfg.text_dim, generator=g).to(device, backend.dtype)
        return TextContext(prompt, contexts[prompt])

    backend.encode_text = encode
    cuda = device.type == "cuda"
    stream = Pipeline(backend, preset=PRESETS[GRAPH_PRESET]).stream("a", height=height, width=width, seed=seed,
                                                                     output="latent")
    chunks, seconds, allocations, core_bytes = [], [], [], []
    with torch.inference_mode():
        for blk in range(blocks):
            if blk == switch_at:
                stream.set_prompt("b", recache=True)
            started = time.perf_counter()
            chunks.append(np.array(next(stream)))  # the block's latents on the host: its GPU work is done
            seconds.append(time.perf_counter() - started)
            allocations.append(torch.cuda.memory_stats(device)["allocation.all.allocated"] if cuda else 0)
            core_bytes.append(_core.memory_stats()["live_bytes"])  # the ring, latents: the core's, not torch's
    stream.close()
    return np.concatenate(chunks, axis=1), seconds, {"allocations_after_block": allocations,
                                                      "core_live_bytes_after_block": core_bytes}


def run_preset_cuda_graphs(device: str = DEVICE, config=None, height: int = 480, width: int = 832,
                           small_size: tuple[int, int] = (64, 96), stream: dict | None = None,
                           speed_dtype: str = "bfloat16") -> dict:
    """The preset's stream: default step, fixed-shape eager, fixed-shape with CUDA graphs (module
    docstring). config/height/width/stream/speed_dtype exist so the tests can run the real code path small
    on a CPU (whose bf16 matmuls are slow)."""
    import torch

    from skyrt.runtime.causal_family import PRESETS
    from skyrt.runtime.memory_plan import WAN21_1_3B
    from skyrt.runtime.model_config import DiTConfig

    require_torch_device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = device.startswith("cuda")
    ways = {"default": {}, "fixed_eager": {"fixed_shapes": True}, "cuda_graphs": {"cuda_graphs": cuda,
                                                                                  "fixed_shapes": True}}
    s = {**GRAPH_STREAM, **(stream or {})}
    report: dict = {"preset": GRAPH_PRESET, "stream": s, "cuda_graphs_run": cuda}

    def equality() -> dict:  # fp32, small: the arithmetic of the three ways
        small = DiTConfig(**SMALL_GRAPH_CONFIG)
        got = {}
        for way, options in ways.items():
            backend = _preset_backend(small, device, torch.float32, 0, **options)
            got[way] = _preset_stream(backend, *small_size, s["blocks"], s["switch_at"], 0, small.text_len)[0]
        fixed = float(np.abs(got["fixed_eager"] - got["default"]).max())
        graphs = float(np.abs(got["cuda_graphs"] - got["fixed_eager"]).max())
        return {"size": list(small_size), "fixed_vs_gather_max_abs_diff": fixed,
                "graphs_vs_eager_max_abs_diff": graphs, "latent_std": float(got["default"].std()),
                "passed": fixed <= FIXED_VS_GATHER_ATOL and graphs <= GRAPHS_VS_EAGER_ATOL}

    def speed() -> dict:  # bf16 at the real shape
        cfg = config or WAN21_1_3B
        out, latents = {}, {}
        for way, options in ways.items():
            backend = _preset_backend(cfg, device, getattr(torch, speed_dtype), 0, **options)
            latents[way], seconds, extra = _preset_stream(backend, height, width, s["blocks"], s["switch_at"], 0,
                                                          cfg.text_len)
            steady = [t for i, t in enumerate(seconds) if i >= s["warmup_blocks"] and i != s["switch_at"]]
            allocs = extra["allocations_after_block"]
            block_s = float(np.median(steady))
            out[way] = {"block_s_all": seconds, "block_s_median": block_s,
                        "video_fps": 4 * PRESETS[GRAPH_PRESET].sampling.causal_block_size / block_s,
                        "torch_allocations_after_warmup": allocs[-1] - allocs[s["warmup_blocks"] - 1],
                        "graph_stats": {str(k): vars(v) for k, v in
                                        (getattr(backend, "last_graph_stats", None) or {}).items()}}
            del backend
            if cuda:
                torch.cuda.empty_cache()
        out["graphs_vs_eager_fps"] = out["cuda_graphs"]["video_fps"] / out["fixed_eager"]["video_fps"]
        out["graphs_vs_default_fps"] = out["cuda_graphs"]["video_fps"] / out["default"]["video_fps"]
        out["bf16_graphs_vs_eager_max_abs_diff"] = float(np.abs(latents["cuda_graphs"] - latents["fixed_eager"]).max())
        out["bf16_fixed_vs_default_max_abs_diff"] = float(np.abs(latents["fixed_eager"] - latents["default"]).max())
        out["size"], out["dtype"] = [height, width], speed_dtype
        out["passed"] = bool(all(np.isfinite(out[w]["video_fps"]) for w in ways))
        return out

    report["equality_fp32"] = _guarded(equality)
    report["speed_bf16"] = _guarded(speed)
    report["passed"] = bool(report["equality_fp32"].get("passed") and report["speed_bf16"].get("passed"))
    return report


TINY_DECODER = dict(parity_latent=(30, 52), parity_frames=3, timing_latent=(60, 104), timed_frames=8)
TINY_DECODER_ATOL = 1e-3  # fp32 both sides (TF32 off), pixels in [-1, 1]


def run_tiny_decoder(device: str = DEVICE, sizes: dict | None = None, seed: int = 0,
                     precisions: tuple[str, ...] = ("fp32", "fp16")) -> dict:
    """TAEHV's tiny decoder, random weights: GPU vs CPU on the same latents, and streaming ms per latent
    frame on the GPU in `precisions` (module docstring). sizes: TINY_DECODER's keys, for the tests."""
    import torch

    from skyrt.export.tiny_vae import TinyDecoder, TinyStreamingDecoder, decode_raw

    require_torch_device(device)
    torch.backends.cudnn.allow_tf32 = False
    sizes = {**TINY_DECODER, **(sizes or {})}
    torch.manual_seed(seed)
    tiny = TinyDecoder().eval()
    h, w = sizes["parity_latent"]
    mu = torch.randn(1, 16, sizes["parity_frames"], h, w, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        on_cpu = decode_raw(tiny, mu)
        on_device = decode_raw(tiny.to(device), mu.to(device)).float().cpu()
    diff = float((on_device - on_cpu).abs().max())
    report = {"parity": {"latent": [h, w], "frames": sizes["parity_frames"], **_result(diff, TINY_DECODER_ATOL)}}
    h, w = sizes["timing_latent"]
    for name in precisions:
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[name]

        def timing(dtype=dtype) -> dict:
            decoder = TinyStreamingDecoder(tiny.to(device, dtype))
            z = torch.randn(1, 16, 1, h, w, device=device, dtype=dtype)
            for _ in range(2):  # the first frame (its own shape) and one steady frame
                decoder.decode_next(z)
            _sync(device)
            started = time.perf_counter()
            for _ in range(sizes["timed_frames"]):
                decoder.decode_next(z)
            _sync(device)
            ms = 1e3 * (time.perf_counter() - started) / sizes["timed_frames"]
            return {"pixels": [8 * h, 8 * w], "ms_per_latent_frame": ms, "video_frames_per_s": 4 / (ms / 1e3),
                    "passed": bool(np.isfinite(ms))}
        report[f"stream_{name}"] = _guarded(timing)
    report["passed"] = all(r.get("passed") for r in report.values())
    return report


MEMORY_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def run_memory_per_precision(device: str = DEVICE, config=None, height: int = 480, width: int = 832,
                             blocks: int = 3) -> dict:
    """The preset's stream per precision: torch's peak allocation (DiT weights, activations, prompt K/V) and
    the rollout core's live buffers (the ring and latents, allocated by the core, not torch) against
    runtime/memory_plan.py's figures for the same preset and size (no text encoder or VAE: not loaded)."""
    import torch

    from skyrt.runtime.memory_plan import WAN21_1_3B, plan_preset

    require_torch_device(device)
    cuda = device.startswith("cuda")
    cfg = config or WAN21_1_3B
    report: dict = {"preset": GRAPH_PRESET, "size": [height, width], "blocks": blocks}
    for name, dtype_name in MEMORY_PRECISIONS.items():
        def one(dtype=getattr(torch, dtype_name), name=name) -> dict:
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            backend = _preset_backend(cfg, device, dtype, 0)
            weights = torch.cuda.memory_allocated(device) if cuda else None
            extra = _preset_stream(backend, height, width, blocks, blocks - 1, 0, cfg.text_len)[2]
            plan = plan_preset(GRAPH_PRESET, height, width, name, text_encoder=False)
            peak = torch.cuda.max_memory_allocated(device) if cuda else None
            del backend
            return {"torch_weights_bytes": weights, "torch_peak_bytes": peak, "core_live_bytes_peak": max(extra["core_live_bytes_after_block"]),
                    "plan_dit_weights_bytes": plan.weights["dit"], "plan_cache_bytes": plan.cache_bytes,
                    "plan_activation_bytes": plan.activation_bytes,
                    "torch_peak_over_plan_weights_plus_activations":
                        None if peak is None else peak / (plan.weights["dit"] + plan.activation_bytes),
                    "passed": True}
        report[name] = _guarded(one)
    report["passed"] = all(report[n].get("passed") for n in MEMORY_PRECISIONS)
    return report


def machine_info(torch_only: bool = False) -> dict:
    info = {"platform": platform.platform(), "python": sys.version.split()[0]}
    if torch_only:
        import torch

        info["gpus"] = torch.cuda.device_count()
        info["torch"] = torch.__version__
        if info["gpus"]:
            info["gpu"] = torch.cuda.get_device_name(0)
            info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        return info
    from skyrt.runtime import cuda_mem

    if cuda_mem.device_count():
        info["compute_capability"] = cuda_mem.compute_capability()
    info["gpus"] = cuda_mem.device_count()
    return info


def main(argv=None) -> int:
    import tempfile

    args = parse_args(argv)
    torch_only = args.mode == "torch-only"
    started = time.perf_counter()
    report = {"benchmark": "gpu_validate", "mode": args.mode}
    if args.build:  # before anything imports skyrt
        report["build"] = _guarded(lambda: run_build(Path(__file__).resolve().parents[1]))
    report["machine"] = _guarded(lambda: machine_info(torch_only))
    if "kernels" in args.sections:
        report["kernels"] = _guarded(lambda: run_kernels(args.seed))
    if "torch_rollout" in args.sections:
        report["torch_rollout"] = _guarded(lambda: run_torch_rollout(args.seed))
    if "throughput" in args.sections:
        report["throughput"] = _guarded(lambda: run_throughput(args.seed, args.sizes))
    if "causal_family" in args.sections:
        report["causal_family"] = _guarded(run_causal_family)
    if "preset_cuda_graphs" in args.sections:
        report["preset_cuda_graphs"] = _guarded(run_preset_cuda_graphs)
    if "tiny_decoder" in args.sections:
        report["tiny_decoder"] = _guarded(run_tiny_decoder)
    if "memory_per_precision" in args.sections:
        report["memory_per_precision"] = _guarded(run_memory_per_precision)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        if {"engines", "rollout"} & set(args.sections):
            report |= run_engines_and_rollout(args, workdir, args.sections)
        if "captioner" in args.sections:
            report["captioner"] = _guarded(lambda: run_captioner(workdir, pick_builder(args.builder)))
    report["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    checked = (["build"] if args.build else []) + [s for s in args.sections if s in report]
    verdicts = {s: report[s].get("passed", report[s].get("all_passed")) for s in checked}
    print(json.dumps(verdicts))
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
