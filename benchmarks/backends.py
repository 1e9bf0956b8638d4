"""One KV-cached DiT step on the CPU: onnxruntime vs torch, and how close ORT gets to matmul peak.

Same random mid-size model (the rollout benchmark's: dim 256, 4 layers, 32x32 latents, one latent
frame per block against a full ring of `--slots` blocks), same inputs, same threads, through the
per-call step on host arrays (tests/step_reference.py: the runtime's stream sessions bind the core's
buffers instead, which this benchmark leaves out to time the graph alone). The two
backends are timed in alternating rounds (10 calls of A, 10 of B, ...) so machine noise hits
all alike; medians are reported. onnxruntime is timed twice, with the backend's default session
(intra-op spinning off) and with onnxruntime's default spinning (`spin=True`): on a loaded machine
spinning doubles the step, on a quiet one it may save a little; both fractions are written. The ORT step's useful FLOPs (counted from the shapes: every GEMM and both attentions,
512 text keys as the graph computes them) over its median time, divided by the best matmul rate
measured here (a large fp32 MatMul through ORT and through torch, same threads), is the fraction
of peak. Writes JSON.

    python benchmarks/backends.py                   # mid-size config
    python benchmarks/backends.py --dim 128 --layers 2 --latent 16 --iters 10    # quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # checkpoints.py: random models


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--latent", type=int, default=32, help="latent height = width")
    p.add_argument("--slots", type=int, default=5, help="cache blocks (1 sink + 4 window, as the rollout benchmark)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=60, help="timed calls per backend, in rounds of 10")
    p.add_argument("--peak-size", type=int, default=2048, help="square MatMul size for the peak measurement")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "backends.json")
    return p.parse_args()


def step_flops(dim: int, ffn: int, layers: int, tokens: int, keys: int, text: int, in_ch: int, patch: int) -> float:
    """Multiply-adds x 2 of one step: per layer self q/k/v/o and cross q/o projections, the FFN, the
    self-attention over `keys` and the cross-attention over `text` keys; plus patch embed and head."""
    per_layer = (2 * tokens * dim * dim * 6  # q, k, v, o (self) + q, o (cross)
                 + 2 * tokens * dim * ffn * 2  # FFN in and out
                 + 2 * tokens * keys * dim * 2  # self-attention: scores and weighted values
                 + 2 * tokens * text * dim * 2)  # cross-attention
    io = 2 * tokens * in_ch * patch * dim * 2  # patch embedding and head
    return layers * per_layer + io


def matmul_peak(size: int, threads: int) -> dict:
    """Best GFLOP/s of a size x size fp32 MatMul through onnxruntime and through torch."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    flops = 2 * size**3

    def best(fn, n=5):
        fn()
        return min(_timed(fn) for _ in range(n))

    ort_s = best(lambda: session.run(None, {"a": a, "b": a}))
    torch.set_num_threads(threads)
    ta = torch.from_numpy(a)
    torch_s = best(lambda: ta @ ta)
    del onnx
    return {"size": size, "ort_gflops": flops / ort_s / 1e9, "torch_gflops": flops / torch_s / 1e9}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import skyrt
    import step_reference  # the per-call step on host arrays (tests/step_reference.py)
    from checkpoints import mid_size_model

    with tempfile.TemporaryDirectory() as tmp:
        _, model_dir = mid_size_model(Path(tmp), args.dim, args.layers)
        ort = dict(backend="onnxruntime", threads=args.threads, cache_dir=Path(tmp) / "cache")
        backends = {"torch": skyrt.load(model_dir).backend,
                    "onnxruntime": skyrt.load(model_dir, **ort).backend,  # the backend's default: no spinning
                    "onnxruntime_spin": skyrt.load(model_dir, spin=True, **ort).backend}
        rng = np.random.default_rng(0)
        latents = rng.standard_normal((16, 1, args.latent, args.latent), dtype=np.float32)
        timesteps = np.array([500.0], np.float32)
        layers, nheads, head_dim = backends["torch"].kv_layout()
        tokens = (args.latent // 2) ** 2
        k = rng.standard_normal((layers, args.slots, tokens, nheads, head_dim), dtype=np.float32)
        v = rng.standard_normal((layers, args.slots, tokens, nheads, head_dim), dtype=np.float32)
        valid = np.ones(args.slots, bool)
        inputs = {}
        for name, backend in backends.items():
            cache = step_reference.new_kv_cache(backend, layers, args.slots, tokens, nheads, head_dim)
            cache.k[...] = k
            cache.v[...] = v
            prompt = step_reference.kv_prompt(backend, backend.encode_text("a red circle"))
            inputs[name] = (latents, timesteps, prompt, cache, valid, args.slots, None, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # (the first call exports the ORT graphs)
            outputs = {name: step_reference.kv_step(backends[name], *inputs[name]) for name in backends}
            for _ in range(3):
                for name in backends:
                    step_reference.kv_step(backends[name], *inputs[name])
            # Alternate in rounds of 10 calls, with a pause between backends: onnxruntime's worker
            # threads spin for a while after each run and would steal the cores from a torch call
            # made right after it (per-call interleaving measured torch 1.8x slower than this).
            times = {name: [] for name in backends}
            for _ in range(max(1, args.iters // 10)):
                for name in backends:
                    time.sleep(0.2)
                    times[name] += [_timed(lambda: step_reference.kv_step(backends[name], *inputs[name]))
                                    for _ in range(10)]
    diff = float(np.abs(outputs["torch"][0] - outputs["onnxruntime"][0]).max())
    median = {name: statistics.median(t) for name, t in times.items()}
    flops = step_flops(args.dim, 4 * args.dim, args.layers, tokens, (args.slots + 1) * tokens, 512, 16, 4)
    peak = matmul_peak(args.peak_size, args.threads)
    best_peak = max(peak["ort_gflops"], peak["torch_gflops"])
    ort_gflops = flops / median["onnxruntime"] / 1e9
    spin_gflops = flops / median["onnxruntime_spin"] / 1e9
    session = backends["onnxruntime"]._sessions
    ort_files = sorted({Path(s._model_path).name for s in session.values() if hasattr(s, "_model_path")})
    report = {
        "benchmark": "backends",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "load_average": os.getloadavg()[0], "device": "cpu"},
        "config": vars(args) | {"out": args.out.name},  # as the other benchmarks: no machine folders
        "step_ms_median": {name: 1e3 * m for name, m in median.items()},
        "step_ms_min": {name: 1e3 * min(t) for name, t in times.items()},
        "ratio_torch_over_ort": median["torch"] / median["onnxruntime"],
        "velocity_max_abs_diff_ort_vs_torch": diff,
        "step_gflop": flops / 1e9,
        "ort_step_gflops": ort_gflops,
        "matmul_peak": peak,
        "ort_fraction_of_matmul_peak": ort_gflops / best_peak,
        "ort_spin_step_gflops": spin_gflops,
        "ort_spin_fraction_of_matmul_peak": spin_gflops / best_peak,
        "ort_graphs": ort_files,
        "note": "torch collapses the text padding to one key (exact); ORT's static graph attends to all 512; "
                "FLOPs are counted for the ORT graph (its RoPE pair-swap MatMuls, 1.7% more, are not: "
                "they are not work the step needs). onnxruntime = the backend's default session (intra-op "
                "spinning off); onnxruntime_spin = the same graph with onnxruntime's default spinning.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("step_ms_median", "ratio_torch_over_ort", "ort_step_gflops",
                                             "matmul_peak", "ort_fraction_of_matmul_peak",
                                             "ort_spin_fraction_of_matmul_peak", "ort_graphs",
                                             "velocity_max_abs_diff_ort_vs_torch")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
