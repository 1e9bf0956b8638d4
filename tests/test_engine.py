"""Engine building with TensorRT-RTX (no GPU needed) and the engine-manifest checks.

Engines are built here but never run: loading and executing an engine needs a GPU
(benchmarks/gpu_validate.py does that on a user's machine).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
trt = pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")

from skyrt.export.engine import (BuildOptions, EngineBuildError, GraphSpec, build_engines,  # noqa: E402
                                 graphs_from_onnx_manifest)
from skyrt.runtime.engine_manifest import (EngineManifest, EngineMismatchError, check_engine,  # noqa: E402
                                           check_engine_size, read_engine_bytes)


class Attention(torch.nn.Module):
    """A past-K/V attention block in fp16 with an fp32 norm: the shape of the cached DiT step."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x, past_k, past_v):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        k_all, v_all = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q.half(), k_all.half(), v_all.half())
        return self.norm(out.float()), k, v


def export_onnx(path: Path, dynamic: bool) -> Path:
    module = Attention().eval()
    args = (torch.randn(1, 8, 32), torch.randn(1, 4, 32), torch.randn(1, 4, 32))
    axes = {"past_k": {1: "cached"}, "past_v": {1: "cached"}} if dynamic else None
    torch.onnx.export(module, args, str(path), input_names=["x", "past_k", "past_v"],
                      output_names=["out", "new_k", "new_v"], dynamic_axes=axes, dynamo=False)
    return path


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("onnx")
    export_onnx(folder / "static.onnx", dynamic=False)
    export_onnx(folder / "dynamic.onnx", dynamic=True)
    manifest = {"precision": "fp32", "export_config": {"height": 64}, "graphs": {
        "static": {"file": "static.onnx"},
        "dynamic": {"file": "dynamic.onnx", "profile": {"past_k": [[1, 0, 32], [1, 4, 32], [1, 16, 32]],
                                                         "past_v": [[1, 0, 32], [1, 4, 32], [1, 16, 32]]}},
    }}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def engines(onnx_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines")
    build_engines(graphs_from_onnx_manifest(onnx_dir), out, BuildOptions(compute_capabilities=["8.6", "8.9"]),
                  progress=False)
    return out


def test_builds_every_graph_with_a_manifest(onnx_dir, engines):
    for name in ("static", "dynamic"):
        engine = engines / f"{name}.engine"
        assert engine.stat().st_size > 1000
        manifest = json.loads((engines / f"{name}.engine.json").read_text())
        assert manifest["onnx_sha256"] == hashlib.sha256((onnx_dir / f"{name}.onnx").read_bytes()).hexdigest()
        assert manifest["builder"] == "tensorrt-rtx" and manifest["builder_version"] == trt.__version__
        assert manifest["compute_capabilities"] == ["8.6", "8.9"]
        assert manifest["export_config"] == {"height": 64}
        assert "skyrt export engine --onnx" in manifest["rebuild"]
        assert manifest["engine_bytes"] == engine.stat().st_size
        assert manifest["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert json.loads((engines / "dynamic.engine.json").read_text())["profile"]["past_k"][0] == [1, 0, 32]


def test_a_dynamic_input_without_a_profile_is_refused(onnx_dir, tmp_path):
    spec = GraphSpec("dynamic", onnx_dir / "dynamic.onnx")
    with pytest.raises(EngineBuildError, match="past_k.*no optimization profile"):
        build_engines([spec], tmp_path, progress=False)


def test_an_unparsable_graph_names_the_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(EngineBuildError, match="could not parse .*bad.onnx"):
        build_engines([GraphSpec("bad", bad)], tmp_path / "out", progress=False)


def test_a_failed_build_says_why(onnx_dir, tmp_path):
    """TensorRT-RTX 1.7 cannot compile fp32 GEMMs for Turing (which is why the default targets leave
    7.5 out); the builder's own error reaches the exception."""
    with pytest.raises(EngineBuildError, match="failed to build .*static.onnx: .*Turing.*FP32 GEMM is not supported"):
        build_engines([GraphSpec("static", onnx_dir / "static.onnx")], tmp_path,
                      BuildOptions(compute_capabilities=["7.5"]), progress=False)


def test_unknown_compute_capability_is_refused(onnx_dir, tmp_path):
    with pytest.raises(ValueError, match="cannot target compute capability 6.1"):
        build_engines([GraphSpec("static", onnx_dir / "static.onnx")], tmp_path,
                      BuildOptions(compute_capabilities=["6.1"]), progress=False)


def test_manifest_check_refuses_mismatches_with_the_rebuild_command(onnx_dir, engines, tmp_path):
    manifest = EngineManifest.read(engines / "static.engine.json")
    ok = dict(builder="tensorrt-rtx", builder_version=trt.__version__)
    check_engine(manifest, gpu_compute_capability="8.9", onnx_path=onnx_dir / "static.onnx", **ok)
    check_engine(manifest, gpu_compute_capability=None, **ok)  # unknown GPU: not checked
    cases = [
        (dict(ok, builder_version="0.0.1"), "built with tensorrt-rtx .* this machine has 0.0.1"),
        (dict(ok, builder="tensorrt"), "built by tensorrt-rtx, this runtime uses tensorrt"),
    ]
    for kwargs, message in cases:
        with pytest.raises(EngineMismatchError, match=message) as err:
            check_engine(manifest, gpu_compute_capability="8.9", **kwargs)
        assert "skyrt export engine --onnx" in str(err.value)
    with pytest.raises(EngineMismatchError, match="targets compute capability 8.6, 8.9, this GPU is 12.0"):
        check_engine(manifest, gpu_compute_capability="12.0", **ok)
    edited = tmp_path / "static.onnx"
    edited.write_bytes((onnx_dir / "static.onnx").read_bytes() + b"\0")
    with pytest.raises(EngineMismatchError, match="sha256 differs"):
        check_engine(manifest, gpu_compute_capability="8.9", onnx_path=edited, **ok)


def test_a_missing_or_foreign_manifest_is_refused(tmp_path):
    with pytest.raises(EngineMismatchError, match="missing"):
        EngineManifest.read(tmp_path / "none.engine.json")
    (tmp_path / "x.engine.json").write_text(json.dumps({"name": "x", "surprise": 1}))
    with pytest.raises(EngineMismatchError, match="not a version-1 skyrt engine manifest"):
        EngineManifest.read(tmp_path / "x.engine.json")


def test_a_corrupted_engine_file_is_refused(engines, tmp_path):
    """A flipped byte (sha256 at load) or a truncated copy (size, checked without reading) names the
    rebuild command instead of failing inside TensorRT."""
    manifest = EngineManifest.read(engines / "static.engine.json")
    data = (engines / "static.engine").read_bytes()
    assert read_engine_bytes(manifest, engines / "static.engine") == data
    flipped = tmp_path / "flipped.engine"
    flipped.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    check_engine_size(manifest, flipped)  # same size: only the hash tells
    with pytest.raises(EngineMismatchError, match="corrupted .*sha256.*skyrt export engine --onnx"):
        read_engine_bytes(manifest, flipped)
    truncated = tmp_path / "truncated.engine"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineMismatchError, match=f"corrupted: {len(data) // 2} bytes, its manifest says {len(data)}"):
        check_engine_size(manifest, truncated)
    with pytest.raises(EngineMismatchError, match="missing"):
        read_engine_bytes(manifest, tmp_path / "gone.engine")


def test_pick_builder_prefers_standard_tensorrt_when_it_imports(monkeypatch):
    import importlib

    from skyrt.export import engine as E

    real = importlib.import_module
    monkeypatch.setattr(E.importlib, "import_module",
                        lambda name: (_ for _ in ()).throw(ImportError(name)) if name == "tensorrt" else real(name))
    assert E.pick_builder("auto") == "tensorrt-rtx"
    monkeypatch.setattr(E.importlib, "import_module", lambda name: object())
    assert E.pick_builder("auto") == "tensorrt"
    assert E.pick_builder("tensorrt-rtx") == "tensorrt-rtx"  # forced
    with pytest.raises(ValueError, match="builder must be"):
        E.pick_builder("onnx")


def test_export_cli_defaults_and_choices():
    """Issue 4: `export engine --builder` defaults to auto; `export onnx --precision` takes bf16;
    the --compute-capability help names the real defaults."""
    import argparse

    from skyrt.export import engine as E
    from skyrt.export.export_cli import add_parser

    parser = argparse.ArgumentParser()
    export = add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "engine", "--onnx", "o", "--out", "e"])
    assert args.builder == "auto" and args.compute_capability is None
    assert parser.parse_args(["export", "onnx", "--out", "o", "--precision", "bf16"]).precision == "bf16"
    engine_help = export._subparsers._group_actions[0].choices["engine"].format_help()
    assert " ".join(E.RTX_COMPUTE_CAPABILITIES) in " ".join(engine_help.split())
