"""The TensorRT path without a GPU: every exported graph builds with TensorRT-RTX (fp32, fp16 and
bf16; window mode's graphs are the DiT step without cache inputs), `skyrt.load(..., backend="tensorrt")` builds engines into the cache from a model folder or an
ONNX export and reuses them, and the backend refuses mismatched or corrupted engines before it
touches the GPU, then fails with a clear CUDA error where there is none.

Running the engines needs an NVIDIA GPU: benchmarks/gpu_validate.py does that on a user's
machine. Nothing here executes an engine. Builds stay small: 32x32 pixels, the tiny model (the
number of TensorRT-RTX targets barely changes build time; the full build uses the default ones so
that a default `skyrt export engine` is what CI proves).

Run: python -m pytest tests/test_tensorrt_backend.py -q
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")
trt = pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")

import skyrt  # noqa: E402
from skyrt.export import engine as engine_module  # noqa: E402
from skyrt.export.engine import BuildOptions, build_engines, graphs_from_onnx_manifest  # noqa: E402
from skyrt.runtime import artifact_cache as ac  # noqa: E402
from skyrt.runtime import cuda_mem  # noqa: E402
from skyrt.runtime.backends import exported_graphs as eg  # noqa: E402
from skyrt.runtime.backends import tensorrt_backend as tb  # noqa: E402
from skyrt.runtime.engine_manifest import ONNX_MANIFEST_COPY, EngineMismatchError  # noqa: E402

CC = ["8.9"]  # an explicit target, to see it recorded in the manifests
TINY = dict(height=32, width=32, block_frames=1, cache_blocks=3, max_active_blocks=2, window_frames=5)
DIT_GRAPHS = ["cross_kv", "dit_window", "dit_window_causal", "dit_step"]  # the graphs with fp16/bf16 variants

RING = {"cache_k", "cache_v", "slot_valid"}  # dit_step's cache inputs


def assert_window_graphs_are_the_step_without_cache(onnx_manifest: dict) -> None:
    """Window mode's graphs are dit_step less its ring inputs, velocity out (what the engines are built from)."""
    step = [i["name"] for i in onnx_manifest["graphs"]["dit_step"]["inputs"]]
    for name in ("dit_window", "dit_window_causal"):
        entry = onnx_manifest["graphs"][name]
        assert [i["name"] for i in entry["inputs"]] == [n for n in step if n not in RING], name
        assert [o["name"] for o in entry["outputs"]] == ["velocity"], name


needs_no_gpu = pytest.mark.skipif(cuda_mem.device_count() > 0,
                                  reason="a GPU is present: benchmarks/gpu_validate.py runs the engines")


def _export(model_dir, out, precision="fp32", graphs=None):
    from skyrt.export.onnx_export import OnnxProfile, export_onnx

    profile = OnnxProfile(**TINY, window_attention="both", precision=precision)
    export_onnx(model_dir, out, profile, graphs=graphs, progress=False)
    return out


@pytest.fixture(scope="module")
def engine_dir(official_dir, tmp_path_factory):
    onnx_dir = _export(official_dir, tmp_path_factory.mktemp("onnx"))
    out = tmp_path_factory.mktemp("engines")
    build_engines(graphs_from_onnx_manifest(onnx_dir), out, BuildOptions(), progress=False)  # default targets
    engine_module.prepare_engine_folder(onnx_dir, out)
    return out


def _no_rebuilds(monkeypatch):
    """Make any ONNX export or engine build fail the test."""
    def fail(*args, **kwargs):
        raise AssertionError(f"exported or built again: {args[:1]}")

    monkeypatch.setattr(subprocess, "run", fail)  # the ONNX exporter runs in a subprocess
    monkeypatch.setattr(engine_module, "build_engines", fail)


# ---------------------------------------------------------------------------------------------
# Every graph builds


def test_every_exported_graph_builds_with_tensorrt_rtx(engine_dir):
    graphs = set(json.loads((engine_dir / ONNX_MANIFEST_COPY).read_text())["graphs"])
    assert {"text_encoder", "cross_kv", "dit_window", "dit_window_causal", "dit_step", "vae_decode_first",
            "vae_decode_step", "vae_encode_first", "vae_encode_step"} <= graphs
    for name in graphs:
        assert (engine_dir / f"{name}.engine").stat().st_size > 0, name
    assert_window_graphs_are_the_step_without_cache(json.loads((engine_dir / ONNX_MANIFEST_COPY).read_text()))
    assert ac.is_engine_folder(engine_dir)
    assert tb.engine_folder_spec(engine_dir).dit_config["num_layers"] >= 1
    manifest = json.loads((engine_dir / "dit_step.engine.json").read_text())
    assert manifest["compute_capabilities"] == list(engine_module.RTX_COMPUTE_CAPABILITIES)


@pytest.mark.parametrize("precision,dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_fp16_and_bf16_graphs_build_with_tensorrt_rtx(official_dir, tmp_path, precision, dtype):
    """Strongly typed builds take the precision from the graph: every graph with a reduced-precision
    variant must parse and build in it (build_engines raises on the first one that does not)."""
    onnx_dir = _export(official_dir, tmp_path / "onnx", precision, graphs=DIT_GRAPHS)
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    inputs = {i["name"]: i["dtype"] for i in manifest["graphs"]["dit_step"]["inputs"]}
    assert inputs["cache_k"] == inputs["cross_k"] == dtype and inputs["latents"] == "float32"
    assert_window_graphs_are_the_step_without_cache(manifest)  # window mode's step graph, in this precision
    for name in ("dit_window", "dit_window_causal"):
        window = {i["name"]: i["dtype"] for i in manifest["graphs"][name]["inputs"]}
        assert window["cross_k"] == dtype and window["latents"] == "float32", name
    paths = build_engines(graphs_from_onnx_manifest(onnx_dir), tmp_path / "engines", BuildOptions(), progress=False)
    assert sorted(p.stem for p in paths) == sorted(DIT_GRAPHS)
    for name in DIT_GRAPHS:
        engine_manifest = json.loads((tmp_path / "engines" / f"{name}.engine.json").read_text())
        assert engine_manifest["precision"] == precision and engine_manifest["engine_bytes"] > 0, name


# ---------------------------------------------------------------------------------------------
# Engine folders: refusals before the GPU, then the GPU


@pytest.mark.parametrize("field,value,message", [
    ("builder_version", "0.0.1", "built with tensorrt-rtx 0.0.1.*skyrt export engine"),
    ("onnx_sha256", "0" * 64, "built from another export of dit_step.*skyrt export engine"),
    ("engine_bytes", 12, "dit_step.engine is corrupted: .* bytes, its manifest says 12.*skyrt export engine"),
])
def test_backend_refuses_a_mismatched_or_corrupted_engine_before_the_gpu(engine_dir, tmp_path, field, value, message):
    copy = tmp_path / "engines"
    shutil.copytree(engine_dir, copy)
    path = copy / "dit_step.engine.json"
    manifest = json.loads(path.read_text())
    manifest[field] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match=message):
        tb.TensorRTBackend(tb.engine_folder_spec(copy))


def test_a_forced_builder_that_did_not_build_the_engines_is_refused(engine_dir, monkeypatch):
    monkeypatch.setattr(engine_module, "import_builder", lambda name: trt)  # no standard TensorRT here
    with pytest.raises(EngineMismatchError, match="built by tensorrt-rtx, this runtime uses tensorrt"):
        tb.TensorRTBackend(tb.engine_folder_spec(engine_dir), builder="tensorrt")


@needs_no_gpu
def test_backend_needs_a_gpu_and_says_so(engine_dir):
    with pytest.raises(cuda_mem.CudaError, match="no usable NVIDIA driver"):
        skyrt.load(engine_dir, backend="tensorrt")


def test_a_folder_that_is_not_an_engine_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an engine folder.*skyrt export engine"):
        tb.TensorRTBackend(tb.ModelSpec(path=tmp_path, layout="engines", dit_config={}))


@needs_no_gpu
def test_engine_folder_path_never_imports_torch(engine_dir):
    script = textwrap.dedent(f"""
        import json, sys
        import skyrt
        from skyrt.runtime.cuda_mem import CudaError
        try:
            skyrt.load({str(engine_dir)!r}, backend="tensorrt")
            error = None
        except CudaError as err:
            error = str(err)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "diffusers"))
        print(json.dumps({{"error": error, "heavy": heavy}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "no usable NVIDIA driver" in report["error"] and report["heavy"] == []


# ---------------------------------------------------------------------------------------------
# Building on first use into the cache


def _cached_engine_folders(cache):
    return sorted(p for p in (cache / ac.ENGINE_CACHE).glob("tensorrt-rtx-*/*") if ac.is_engine_folder(p))


@needs_no_gpu
def test_model_folder_builds_engines_on_first_use_and_reuses_them(official_dir, tmp_path, monkeypatch):
    """First load (a subprocess, to prove it torch-free: the ONNX export runs in its own subprocess):
    the text graphs are exported and built into the cache, then opening the GPU fails clearly.
    Second load: the same engines, no export, no build, the same clear error."""
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import json, sys
        import skyrt
        from skyrt.runtime.cuda_mem import CudaError
        pipe = skyrt.load({str(official_dir)!r}, backend="tensorrt", cache_dir={str(cache)!r},
                          compute_capabilities={CC!r}, progress=False)
        try:
            pipe.backend.encode_text("a fox")
            error = None
        except CudaError as err:
            error = str(err)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "diffusers"))
        print(json.dumps({{"error": error, "heavy": heavy, "builder": pipe.backend.builder}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "no usable NVIDIA driver" in report["error"] and report["heavy"] == []
    assert report["builder"] == "tensorrt-rtx"  # auto: no standard TensorRT here
    (folder,) = _cached_engine_folders(cache)
    assert folder.parent.name == f"tensorrt-rtx-{trt.__version__}"
    assert {p.name for p in folder.glob("*.engine")} == {"text_encoder.engine", "cross_kv.engine"}
    manifest = json.loads((folder / "cross_kv.engine.json").read_text())
    assert manifest["compute_capabilities"] == CC and manifest["precision"] == "fp16"  # fp16 by default
    assert f"--out {folder}" in manifest["rebuild"]  # the final folder, not the staging one
    assert not list(folder.parent.glob(".*"))  # no staging leftovers

    _no_rebuilds(monkeypatch)
    pipe = skyrt.load(official_dir, backend="tensorrt", cache_dir=cache, compute_capabilities=CC, progress=False)
    with pytest.raises(cuda_mem.CudaError, match="no usable NVIDIA driver"):
        pipe.backend.encode_text("a fox")
    assert _cached_engine_folders(cache) == [folder]
    assert pipe.backend._folders == [folder]


@needs_no_gpu
def test_onnx_folder_is_built_into_the_cache_on_load(official_dir, tmp_path, monkeypatch):
    onnx_dir = _export(official_dir, tmp_path / "onnx", graphs=["cross_kv"])
    cache = tmp_path / "cache"
    with pytest.raises(cuda_mem.CudaError, match="no usable NVIDIA driver"):
        skyrt.load(onnx_dir, backend="tensorrt", cache_dir=cache, compute_capabilities=CC, progress=False)
    (folder,) = _cached_engine_folders(cache)
    assert (folder / "cross_kv.engine").is_file()
    _no_rebuilds(monkeypatch)
    with pytest.raises(cuda_mem.CudaError):  # built once: the second load goes straight to the GPU
        skyrt.load(onnx_dir, backend="tensorrt", cache_dir=cache, compute_capabilities=CC, progress=False)
    # another target is another cache entry
    with pytest.raises(AssertionError, match="built again"):
        skyrt.load(onnx_dir, backend="tensorrt", cache_dir=cache, compute_capabilities=["12.0"], progress=False)


def test_cache_key_covers_onnx_hashes_builder_version_and_targets():
    onnx = {"graphs": {"cross_kv": {"sha256": {"cross_kv.onnx": "a"}}}}
    options = BuildOptions(compute_capabilities=["8.9"])
    key = ac.engine_cache_key(onnx, options, "1.0")
    changed = [
        ac.engine_cache_key({"graphs": {"cross_kv": {"sha256": {"cross_kv.onnx": "b"}}}}, options, "1.0"),
        ac.engine_cache_key(onnx, BuildOptions(builder="tensorrt", compute_capabilities=["8.9"]), "1.0"),
        ac.engine_cache_key(onnx, options, "1.1"),
        ac.engine_cache_key(onnx, BuildOptions(compute_capabilities=["8.6"]), "1.0"),
        ac.engine_cache_key(onnx, BuildOptions(compute_capabilities=["8.9"], optimization_level=5), "1.0"),
    ]
    assert key == ac.engine_cache_key(onnx, BuildOptions(compute_capabilities=["8.9"]), "1.0")
    assert len({key, *changed}) == 1 + len(changed)


def test_the_runtime_refuses_bf16_before_building(official_dir, tmp_path, monkeypatch):
    """bf16 engines build (above) but the host side has no bfloat16 arrays: refused up front."""
    with pytest.raises(ValueError, match="bf16.*no bfloat16"):
        tb.TensorRTBackend(tb.engine_folder_spec(official_dir), precision="bf16")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": eg.FORMAT, "precision": "bf16", "graphs": {},
                                                        "model": {"dit_config": {"num_layers": 2, "num_heads": 2,
                                                                                 "dim": 32}}}))
    _no_rebuilds(monkeypatch)
    with pytest.raises(ValueError, match="holds bf16 graphs"):
        tb.TensorRTBackend(tb.engine_folder_spec(tmp_path), cache_dir=tmp_path / "cache")


def test_export_engine_cli_builds_an_engine_folder(official_dir, tmp_path):
    from skyrt.runtime.cli import main

    onnx_dir, out = tmp_path / "onnx", tmp_path / "engines"
    assert main(["export", "onnx", "--model", str(official_dir), "--out", str(onnx_dir), "--height", "32", "--width",
                 "32", "--graphs", "cross_kv", "--no-progress"]) == 0
    assert main(["export", "engine", "--onnx", str(onnx_dir), "--out", str(out), "--compute-capability", "8.6",
                 "--no-progress"]) == 0
    assert ac.is_engine_folder(out)
    assert json.loads((out / "cross_kv.engine.json").read_text())["compute_capabilities"] == ["8.6"]
