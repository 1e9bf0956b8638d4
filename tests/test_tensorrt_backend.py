"""The TensorRT path without a GPU: every exported graph builds with TensorRT-RTX, and the
TensorRT backend checks an engine folder and refuses mismatches before it touches the GPU.

Running the engines needs an NVIDIA GPU: benchmarks/gpu_validate.py does that on a user's
machine. Nothing here executes an engine.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
trt = pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")

from skyrt.export.engine import BuildOptions, build_engines, graphs_from_onnx_manifest  # noqa: E402
from skyrt.runtime.engine_manifest import EngineMismatchError  # noqa: E402
from skyrt.runtime.backends import tensorrt_backend as tb  # noqa: E402


@pytest.fixture(scope="module")
def engine_dir(official_dir, tmp_path_factory):
    from skyrt.export.onnx_export import OnnxProfile, export_onnx

    onnx_dir = tmp_path_factory.mktemp("onnx")
    profile = OnnxProfile(height=32, width=32, block_frames=1, cache_blocks=3, max_active_blocks=2, window_frames=5,
                          window_attention="both")
    export_onnx(official_dir, onnx_dir, profile, progress=False)
    out = tmp_path_factory.mktemp("engines")
    build_engines(graphs_from_onnx_manifest(onnx_dir), out, BuildOptions(compute_capabilities=["8.9", "12.0"]),
                  progress=False)
    tb.prepare_engine_folder(onnx_dir, out)
    return out


def test_every_exported_graph_builds_with_tensorrt_rtx(engine_dir):
    graphs = set(json.loads((engine_dir / tb.ONNX_MANIFEST_COPY).read_text())["graphs"])
    assert {"text_encoder", "cross_kv", "dit_window", "dit_window_causal", "dit_step", "vae_decode_first",
            "vae_decode_step", "vae_encode_first", "vae_encode_step"} <= graphs
    for name in graphs:
        assert (engine_dir / f"{name}.engine").stat().st_size > 0, name
    assert tb.is_engine_folder(engine_dir)
    assert tb.engine_folder_spec(engine_dir).dit_config["num_layers"] >= 1


def test_backend_refuses_a_version_mismatch_before_the_gpu(engine_dir, tmp_path):
    import shutil

    copy = tmp_path / "engines"
    shutil.copytree(engine_dir, copy)
    path = copy / "dit_step.engine.json"
    manifest = json.loads(path.read_text())
    manifest["builder_version"] = "0.0.1"
    path.write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match="built with tensorrt-rtx 0.0.1.*skyrt export engine"):
        tb.TensorRTBackend(tb.engine_folder_spec(copy))


def test_backend_needs_a_gpu_and_says_so(engine_dir):
    from skyrt.runtime import cuda_mem

    if cuda_mem.device_count():
        pytest.skip("a GPU is present: benchmarks/gpu_validate.py runs the engines")
    with pytest.raises(cuda_mem.CudaError, match="no usable NVIDIA driver"):
        tb.TensorRTBackend(tb.engine_folder_spec(engine_dir))


def test_an_onnx_folder_is_not_an_engine_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an engine folder.*skyrt export engine"):
        tb.TensorRTBackend(tb.ModelSpec(path=tmp_path, layout="engines", dit_config={}))


def test_export_engine_cli_builds_an_engine_folder(official_dir, tmp_path):
    from skyrt.runtime.cli import main

    onnx_dir, out = tmp_path / "onnx", tmp_path / "engines"
    assert main(["export", "onnx", "--model", str(official_dir), "--out", str(onnx_dir), "--height", "32", "--width",
                 "32", "--graphs", "cross_kv", "--no-progress"]) == 0
    assert main(["export", "engine", "--onnx", str(onnx_dir), "--out", str(out), "--compute-capability", "8.6",
                 "--no-progress"]) == 0
    assert tb.is_engine_folder(out)
    assert json.loads((out / "cross_kv.engine.json").read_text())["compute_capabilities"] == ["8.6"]
