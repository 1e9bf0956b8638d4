"""benchmarks/gpu_validate.py: the parts that run without a GPU.

On this machine (no NVIDIA driver) every kernel check must report the CUDA error instead of
crashing, and the script must exit non-zero; with a GPU the same test demands that they pass.
The torch-only mode's rollout and throughput sections run here on the CPU (device="cpu", a small
config): the same code as on the GPU minus the device; the DiT FLOP count it reports is checked
against torch's FlopCounterMode. Nothing here ran on a GPU.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from benchmark_scripts import load_benchmark



def need_cuda_python():
    """The full mode's device memory goes through cuda-python; the torch-only mode does without."""
    pytest.importorskip("cuda.bindings", reason="pip install cuda-python (the test extra installs it)")


def test_kernel_section_reports_every_kernel(tmp_path):
    need_cuda_python()
    from skyrt import _core
    from skyrt.runtime import cuda_mem

    gv = load_benchmark("gpu_validate")
    out = tmp_path / "report.json"
    code = gv.main(["--sections", "kernels", "--out", str(out)])
    report = json.loads(out.read_text())
    kernels = report["kernels"]
    if not _core.cuda.available():
        assert "no CUDA kernels" in kernels["error"] and code == 1
        return
    names = set(gv.kernel_cases(None))
    assert names <= set(kernels) and len(names) == 9  # 8 kernels, UniPC with and without the DF aliasing
    if cuda_mem.device_count() == 0:
        assert code == 1 and report["machine"]["gpus"] == 0
        for name in names:
            assert kernels[name]["passed"] is False and "cuda" in kernels[name]["error"].lower()
    else:  # on a GPU machine this test is the real validation
        assert code == 0 and all(kernels[name]["passed"] for name in names), kernels


def test_builder_choice_and_cuda_errors_are_clear():
    need_cuda_python()
    gv = load_benchmark("gpu_validate")
    assert gv.pick_builder("tensorrt-rtx") == "tensorrt-rtx"
    assert gv.pick_builder("auto") in ("tensorrt", "tensorrt-rtx")
    from skyrt.runtime import cuda_mem

    if cuda_mem.device_count() == 0:
        with pytest.raises(cuda_mem.CudaError, match="cudaMalloc.*failed"):
            cuda_mem.DeviceArray.empty((4,), "float32")


def test_captioner_section_runs_up_to_the_gpu_and_records_why_it_stopped(tmp_path):
    need_cuda_python()
    pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")
    from skyrt.runtime import cuda_mem

    if cuda_mem.device_count() > 0:
        pytest.skip("a GPU is present: run the script itself")
    gv = load_benchmark("gpu_validate")
    frames = gv._smooth_frames(16, 36, 42)
    assert frames.shape == (16, 36, 42, 3) and frames.dtype == np.uint8 and len(np.unique(frames[:, 0, 0, 0])) == 16
    out = tmp_path / "report.json"
    assert gv.main(["--sections", "captioner", "--out", str(out), "--workdir", str(tmp_path)]) == 1
    section = json.loads(out.read_text())["captioner"]
    assert section["passed"] is False and section["error"].startswith("CudaError"), section
    # Everything before the GPU happened: the ORT export and the TensorRT-RTX engines exist.
    assert list((tmp_path / "captioner-cache").glob("captioner/*/*/manifest.json"))
    assert list((tmp_path / "captioner-cache").glob("engines/*/captioner-*/vision.engine"))


def test_captioner_report_helpers():
    gv = load_benchmark("gpu_validate")
    assert gv.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert gv.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert gv.first_difference([1, 2], [1, 2, 3]) == 2  # one stopped early
    timings = gv._per_token({"prefill_s": 0.5, "decode_s": 0.2, "decode_steps": 4})
    assert timings["decode_ms_per_token"] == pytest.approx(50.0) and timings["prefill_s"] == 0.5
    assert gv._per_token({"decode_s": 0.0, "decode_steps": 0})["decode_ms_per_token"] is None


def test_torch_only_mode_rollout_and_throughput_run_on_the_cpu():
    """The torch-only sections with the GPU swapped for the CPU: the rollout comparison runs both
    sides (cpu vs cpu here: identical), the throughput section drives the real code path on a small
    config and reports finite numbers."""
    from skyrt.runtime.model_config import DiTConfig

    gv = load_benchmark("gpu_validate")
    rollout = gv.run_torch_rollout(0, device="cpu")
    assert rollout["passed"], rollout
    for name in gv.ROLLOUT_CASES:
        assert rollout[name]["max_abs_diff"] == 0.0 and rollout[name]["latent_std"] > 0.1
    small = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, text_len=16,
                      inject_sample_info=True)
    report = gv.run_throughput(0, ["32x48"], device="cpu", config=small, peak_n=128)
    assert report["passed"], report
    size = report["32x48"]
    assert size["ms_per_block"] > 0 and size["pixel_fps"] == pytest.approx(12 / (size["ms_per_block"] / 1e3))
    assert 0 < size["share_of_bf16_matmul_peak"] and size["vae_decode"]["passed"], size
    assert len(size["ms_per_block_all"]) == gv.THROUGHPUT["warmup_blocks"] + gv.THROUGHPUT["measured_blocks"]
    family = gv.run_causal_family(device="cpu", shape="tiny", blocks=3)  # the 1.3B shape's code path, tiny
    assert family["passed"] and family["blocks"] == 3 and family["video_fps_steady"] > 0, family


def test_torch_only_preset_graph_decoder_and_memory_sections_run_on_the_cpu():
    """The sections added for the causal presets, with the GPU swapped for the CPU and small shapes: the
    three ways of the preset's stream agree (graphs fall back to the eager fixed-shape step here, so
    graphs == eager exactly), the tiny decoder's parity and timings are finite, and every precision's
    memory entry carries the plan's figures."""
    import warnings

    from skyrt.runtime.model_config import DiTConfig

    gv = load_benchmark("gpu_validate")
    small = DiTConfig(**gv.SMALL_GRAPH_CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the CPU's "cuda_graphs needs a CUDA device"
        graphs = gv.run_preset_cuda_graphs(device="cpu", config=small, height=32, width=48, small_size=(32, 48),
                                           stream=dict(blocks=4, switch_at=2, warmup_blocks=1), speed_dtype="float32")
    assert graphs["passed"] and not graphs["cuda_graphs_run"], graphs
    equality = graphs["equality_fp32"]
    assert equality["graphs_vs_eager_max_abs_diff"] == 0.0 and 0 < equality["fixed_vs_gather_max_abs_diff"] <= 1e-4
    speed = graphs["speed_bf16"]
    assert speed["graphs_vs_eager_fps"] > 0 and len(speed["default"]["block_s_all"]) == 4
    # fp32 only: fp16 convolutions on this CPU take seconds per frame (the GPU runs both)
    tiny = gv.run_tiny_decoder(device="cpu", sizes=dict(parity_latent=(4, 6), parity_frames=2, timing_latent=(4, 6),
                                                        timed_frames=2), precisions=("fp32",))
    assert tiny["passed"] and tiny["parity"]["max_abs_diff"] == 0.0, tiny
    assert tiny["stream_fp32"]["ms_per_latent_frame"] > 0
    memory = gv.run_memory_per_precision(device="cpu", config=small, height=32, width=48, blocks=2)
    for name in gv.MEMORY_PRECISIONS:
        entry = memory[name]
        if "error" in entry:  # a CPU without half-precision kernels records why
            continue
        assert entry["plan_dit_weights_bytes"] > 0 and entry["core_live_bytes_peak"] > 0, entry
    assert memory["fp32"]["passed"], memory


def test_torch_only_command_without_a_gpu_reports_every_section_and_fails(tmp_path, monkeypatch):
    """The one command of the torch-only mode, end to end on a machine without a GPU: the build step
    runs its command (a stand-in here: rebuilding the extension is CI's job) and records the build
    info, then each section records why it stopped instead of ending the run, and the exit code is 1.
    With a GPU the same command is the real validation; this machine has none."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run the script itself")
    gv = load_benchmark("gpu_validate")
    args = gv.parse_args(["--mode", "torch-only"])
    assert args.sections == ["kernels", "torch_rollout", "throughput", "causal_family", "preset_cuda_graphs",
                             "tiny_decoder", "memory_per_precision"] and args.sizes == ["480x832", "544x960"]
    # The offline build the mode promises: no build isolation (no network), no dependency resolution.
    assert gv.BUILD_COMMAND[1:] == ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    monkeypatch.setattr(gv, "BUILD_COMMAND", [sys.executable, "-c", "print('stand-in build')"])
    out = tmp_path / "report.json"
    assert gv.main(["--mode", "torch-only", "--build", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    build = report["build"]
    assert build["returncode"] == 0 and "stand-in build" in build["output_tail"]
    assert build["passed"] is True and build["build_info"]["cuda"] is True  # this build compiled the kernels
    assert report["machine"]["gpus"] == 0 and report["machine"]["torch"] == torch.__version__
    for name in gv.kernel_cases(None):
        assert report["kernels"][name]["passed"] is False and "cuda" in report["kernels"][name]["error"].lower()
    for section in ("torch_rollout", "throughput", "causal_family", "preset_cuda_graphs", "tiny_decoder",
                    "memory_per_precision"):  # cuda:0 does not exist here: recorded, not raised
        assert report[section]["passed"] is False and "sees no CUDA device for cuda:0" in report[section]["error"]


def test_forward_flops_agree_with_torch_flop_counter(monkeypatch):
    """forward_flops (projections, FFN, attention over cache + active tokens and over the text) against
    torch's FlopCounterMode on a real KV-cached step: the counter also sees the patch embedding, the
    head and the time embedding, which the formula leaves out (a few percent at this size, less at
    DF-1.3B's)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import skyrt.export.dit as dit_module
    from skyrt.export.cached_step import CachedStep, active_rope
    from skyrt.runtime.model_config import DiTConfig

    gv = load_benchmark("gpu_validate")
    monkeypatch.setattr(dit_module, "_onednn_linear_applies", lambda x: False)  # plain aten linears, counted
    cfg = DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=4, freq_dim=32, text_dim=32, text_len=16)
    torch.manual_seed(0)
    dit = dit_module.WanDiT(cfg).eval()
    frames, h, w, slots = 2, 8, 8, 3
    tokens_per_frame = (h // 2) * (w // 2)
    cached = slots * tokens_per_frame
    with torch.inference_mode():
        cross = dit.cross_attention_kv(torch.randn(1, cfg.text_len, cfg.text_dim))
        cache = torch.randn(cfg.num_layers, 1, cached, cfg.num_heads, cfg.head_dim)
        cos, sin = active_rope(dit, 3, frames, h // 2, w // 2)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # attention as bmm
            CachedStep(dit)(torch.randn(1, 16, frames, h, w), torch.full((1, frames), 500.0), cross, cache, cache,
                            None, cos, sin)
    counted = counter.get_total_flops()
    formula = gv.forward_flops(cfg, frames * tokens_per_frame, cached, cfg.text_len)
    print(f"forward_flops {formula:.4g}, FlopCounterMode {counted:.4g}")
    assert 0.95 * counted <= formula <= counted
