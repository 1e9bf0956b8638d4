"""The onnxruntime backend against the torch reference backend, on the same tiny model and seed.

Whole rollouts (window mode with full and block-causal attention, kvcache mode with evictions,
streams, an image prefix) must give the torch backend's latents within 1e-4 and its frames within one
uint8 level; the torch-free serving path is checked in a subprocess; a model folder is exported into
the cache once; the backend refuses what it cannot run faithfully.

Run: python -m pytest tests/test_onnxruntime_backend.py -q
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import skyrt  # noqa: E402
from skyrt.export import dit as D  # noqa: E402
from skyrt.export.onnx_export import OnnxProfile, export_onnx  # noqa: E402
from skyrt.runtime.backends import onnxruntime_backend as ob  # noqa: E402
from skyrt.runtime.model_folder import inspect_model_folder  # noqa: E402

TOL = 1e-4
SIZE = dict(height=32, width=32)
SMALL = dict(**SIZE, num_inference_steps=4, shift=8.0, progress=False)
PROFILE = OnnxProfile(**SIZE, block_frames=1, cache_blocks=3, window_frames=5, window_attention="both")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Official layout, DF-1.3B-like (fps embedding on), weights at O(1)-activation scales."""
    from checkpoints import build_diffusers_pipeline, randomize_scaled_, write_official_layout

    root = tmp_path_factory.mktemp("ort-model")
    pipe = build_diffusers_pipeline(root / "src", seed=7, inject_sample_info=True)
    randomize_scaled_(pipe.transformer, 8)
    randomize_scaled_(pipe.vae, 9)
    return write_official_layout(pipe, root / "model")


@pytest.fixture(scope="module")
def export_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort-export")
    export_onnx(model_dir, out, PROFILE, progress=False)
    return out


@pytest.fixture(scope="module")
def torch_pipe(model_dir):
    return skyrt.load(model_dir)


@pytest.fixture(scope="module")
def ort_pipe(export_dir):
    return skyrt.load(export_dir, backend="onnxruntime")


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # kvcache on a bidirectional checkpoint warns
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Host-side inputs and tokenizer (the numpy/tokenizers ports of the torch code)


def _official_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The official Wan2.1 sinusoidal_embedding_1d (float64 angles, cos half first), the oracle."""
    half = dim // 2
    position = t.reshape(-1).to(torch.float64)
    angles = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float().reshape(*t.shape, dim)


def test_host_inputs_equal_the_torch_functions():
    # the sinusoid has one definition (runtime/rope.py, which the torch model also uses): check it
    # against the official formula; the RoPE tables' oracle is tests/test_dit.py's complex formula
    t = np.array([[999.0, 937.5, 500.0, 1.0, 0.0]], np.float32)
    ref = _official_sinusoid(torch.from_numpy(t), 256).numpy()
    assert np.abs(ob.timestep_sinusoid(t, 256) - ref).max() <= 1e-6
    for head_dim, first, frames, h, w in [(16, 0, 3, 2, 2), (128, 1000, 4, 3, 5), (64, 17, 1, 4, 1)]:
        cos, sin = ob.rope_cos_sin(head_dim, first, frames, h, w, 1024)
        rcos, rsin = D.rope_cos_sin(head_dim, range(first, first + frames), h, w)
        assert cos.shape == tuple(rcos.shape)
        assert np.abs(cos - rcos.numpy()).max() <= 1e-6 and np.abs(sin - rsin.numpy()).max() <= 1e-6
    with pytest.raises(ValueError, match="RoPE table"):
        ob.rope_cos_sin(16, 1022, 3, 2, 2, 1024)


def test_tokenizer_matches_transformers(torch_pipe, ort_pipe):
    reference = torch_pipe.backend.text_encoder
    ort_pipe.backend.encode_text("warm up")  # builds the tokenizer
    tokenizer = ort_pipe.backend._tokenizer
    prompts = ["A cat walks along the beach.", "  the   DOG &amp;amp; a  fox\n\tjumps, caf\u00c3\u00a9  ", "",
               "a red fox runs " * 400]  # the last one is truncated to text_len with </s> kept
    for prompt in prompts:
        ids, mask = tokenizer(prompt)
        rids, rmask = reference.tokenize([prompt])
        assert ids.shape == (1, reference.text_len)
        np.testing.assert_array_equal(ids, rids.numpy())
        np.testing.assert_array_equal(mask, rmask.numpy())


def test_encode_text_matches_torch(torch_pipe, ort_pipe):
    for prompt in ("a red circle bouncing", ""):
        ref = torch_pipe.backend.encode_text(prompt).value.numpy()
        got = ort_pipe.backend.encode_text(prompt).value
        assert got.shape == ref.shape and np.abs(got - ref).max() <= TOL


# ---------------------------------------------------------------------------------------------
# Rollouts: the same model and seed through both backends


@pytest.mark.parametrize("settings", [
    dict(num_frames=9, guidance_scale=5.0, fps=24),  # CFG, fps class 1, full attention (dit_window)
    dict(num_frames=13, guidance_scale=1.0, fps=16, ar_step=1, causal_attention=True),  # dit_window_causal
    dict(num_frames=21, guidance_scale=5.0, base_num_frames=13, overlap_history=5, overlap_carry="latent"),
])
def test_window_mode_matches_torch(torch_pipe, ort_pipe, settings):
    kwargs = {**SMALL, **settings}
    ref = torch_pipe.generate("a red circle", output="latent", seed=3, **kwargs)
    got = ort_pipe.generate("a red circle", output="latent", seed=3, **kwargs)
    print(f"window {settings}: max |ort - torch| = {np.abs(got - ref).max():.2e}")
    assert got.shape == ref.shape and np.abs(got - ref).max() <= TOL


def test_window_mode_frames_and_image_prefix_match_torch(torch_pipe, ort_pipe):
    image = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # I2V: vae_encode graphs
    kwargs = dict(**SMALL, num_frames=9, guidance_scale=5.0, image=image, seed=5)
    ref, got = torch_pipe.generate("a fox", **kwargs), ort_pipe.generate("a fox", **kwargs)
    assert got.shape == ref.shape == (9, 32, 32, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert ref.std() > 10  # the frames are not flat: the comparison means something


@pytest.mark.parametrize("causal", [False, True])
def test_window_step_graph_matches_the_torch_forward(torch_pipe, ort_pipe, export_dir, causal):
    """Window mode's DiT entry on onnxruntime: the stream session (GraphKVStreamSession) over the window
    graph, the step with no cache inputs (its ORT-CPU variant here), cond and uncond as one batch-2 step
    on a window core's buffers == the torch backend's WanDiT.forward per context (tests/step_reference.py),
    at fp32 tolerance; a window step has no K/V to commit."""
    import step_reference
    from skyrt import _core
    from skyrt.runtime.backends.base import KVStepCall, KVStreamSpec, TextContext
    from skyrt.runtime.backends.exported_graphs import GraphKVStreamSession

    backend, frames, (h, w) = ort_pipe.backend, 4, (4, 4)
    layers, heads, head_dim = backend.kv_layout()
    spec = KVStreamSpec(contexts=2, causal_block_size=1, max_frames=frames, slots=0, latent_size=(h, w),
                        layers=layers, heads=heads, head_dim=head_dim, fps_class=1, block_causal=causal)
    session = backend.open_kv_stream(spec)
    assert isinstance(session, GraphKVStreamSession)
    assert session.step_graph.name == ("dit_window_causal" if causal else "dit_window")
    variant = export_dir / f"{session.step_graph.name}.ort_cpu.onnx"
    assert backend._session(session.step_graph)._model_path == str(variant)
    core = _core.RolloutCore.window([999, 937, 833, 624], [0.999, 0.937, 0.833, 0.624, 0.0], ar_step=0,
                                    causal_block_size=1, prefix_blocks=0, window_blocks=frames, end_blocks=0,
                                    height=h, width=w, contexts=2)
    core.load_window(np.random.default_rng(1).standard_normal((16, frames, h, w), dtype=np.float32))
    core.next_row()
    assert core.pack_window() == frames
    contexts = [backend.encode_text(p) for p in ("a red circle", "blurry")]
    session.bind(core)
    session.set_prompts(contexts)
    timesteps = np.array([999.0, 700.0, 400.0, 100.0], np.float32)  # every frame at its own timestep
    session.step(KVStepCall(frames=frames, timesteps=timesteps, position=0, slot_valid=np.zeros(0, bool)))
    x = core.buffer("latents_in", frames).numpy()[0]
    got = core.buffer("velocity", frames).numpy()
    for b, context in enumerate(contexts):
        torch_context = TextContext(context.prompt, torch.from_numpy(np.array(context.value)))
        want = step_reference.predict_velocity(torch_pipe.backend, x, timesteps, torch_context, 1,
                                               1 if causal else None)
        print(f"window step, causal={causal}, context {b}: max |ort - torch| = {np.abs(got[b] - want).max():.2e}")
        assert np.abs(got[b] - want).max() <= TOL
    assert np.abs(got[0] - got[1]).max() > 10 * TOL  # the two prompts differ: batch rows are not mixed up
    with pytest.raises(ValueError, match="no K/V to commit"):
        session.step(KVStepCall(frames=frames, timesteps=timesteps, position=0, slot_valid=np.zeros(0, bool),
                                want_kv=True))
    session.close()
    core.close()


def test_window_session_refuses_a_graph_with_other_io(ort_pipe):
    """The exported graph I/O-name check: a window graph with the ring's inputs (an export this runtime
    does not know) is refused, naming the graph, both name lists and the fix."""
    from skyrt.runtime.backends.base import KVStreamSpec
    from skyrt.runtime.backends.graph_files import GraphFile

    backend = ort_pipe.backend
    layers, heads, head_dim = backend.kv_layout()
    spec = KVStreamSpec(contexts=1, causal_block_size=1, max_frames=3, slots=0, latent_size=(4, 4), layers=layers,
                        heads=heads, head_dim=head_dim, fps_class=1, block_causal=False)
    real = backend.dit_graph(spec)
    step = backend._graph("dit_step", **SIZE, block_frames=1, cache_blocks=PROFILE.cache_blocks)
    foreign = GraphFile(real.name, real.folder, {**real.entry, "inputs": step.entry["inputs"]})
    backend.dit_graph = lambda spec: foreign
    try:
        with pytest.raises(ValueError, match=r"dit_window graph's inputs are .*cache_k.*re-export it"):
            backend.open_kv_stream(spec)
    finally:
        del backend.dit_graph


@pytest.mark.parametrize("settings", [
    dict(num_frames=9, ar_step=1, guidance_scale=5.0),  # CFG: two prompts, two caches
    dict(num_frames=21, ar_step=2, guidance_scale=1.0),  # 6 blocks through a 3-slot ring: evictions
])
def test_kvcache_mode_matches_torch(torch_pipe, ort_pipe, settings):
    kwargs = dict(**SMALL, mode="kvcache", causal_block_size=1, sink_blocks=1, window_blocks=2, **settings)
    ref = _quiet(torch_pipe.generate, "a red circle", output="latent", seed=6, **kwargs)
    got = _quiet(ort_pipe.generate, "a red circle", output="latent", seed=6, **kwargs)
    print(f"kvcache {settings}: max |ort - torch| = {np.abs(got - ref).max():.2e}")
    assert got.shape == ref.shape and np.abs(got - ref).max() <= TOL


def test_cpu_provider_runs_the_ort_cpu_step_variant(ort_pipe, export_dir):
    """On the CPU provider the KV-cached step runs dit_step.ort_cpu.onnx (contrib ops; the rollouts above
    compare it with torch); a GPU provider would get dit_step.onnx, the graph TensorRT builds."""
    backend = ort_pipe.backend
    graph = backend._graph("dit_step", **SIZE, block_frames=1, cache_blocks=PROFILE.cache_blocks)
    assert graph.path_for("CPUExecutionProvider") == export_dir / "dit_step.ort_cpu.onnx"
    assert graph.path_for("TensorrtExecutionProvider") == graph.path_for("CUDAExecutionProvider") == graph.path
    assert backend._session(graph)._model_path == str(export_dir / "dit_step.ort_cpu.onnx")
    assert backend.spin is False and skyrt.load(export_dir, backend="onnxruntime", spin=True).backend.spin


def test_kvcache_stream_frames_match_torch(torch_pipe, ort_pipe):
    kwargs = dict(**SIZE, num_inference_steps=4, mode="kvcache", ar_step=2, causal_block_size=1, sink_blocks=1,
                  window_blocks=2, guidance_scale=1.0, seed=8, max_chunks=5)
    ref = np.concatenate(_quiet(lambda: list(torch_pipe.stream("a fox", **kwargs))))
    got = np.concatenate(_quiet(lambda: list(ort_pipe.stream("a fox", **kwargs))))
    assert got.shape == ref.shape == (1 + 4 * 4, 32, 32, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_vae_paths_match_torch(torch_pipe, ort_pipe):
    mu = np.random.default_rng(1).standard_normal((16, 3, 4, 4)).astype(np.float32)
    ref = torch_pipe.backend.vae_decode(mu)
    assert np.abs(ort_pipe.backend.vae_decode(mu) - ref).max() <= TOL
    decoder = ort_pipe.backend.streaming_decoder()
    streamed = np.concatenate([decoder.decode_next(mu[:, i:i + 1]) for i in range(3)], axis=1)
    assert np.abs(streamed - ref).max() <= TOL
    pixels = np.clip(ref, -1, 1)
    assert np.abs(ort_pipe.backend.vae_encode(pixels) - torch_pipe.backend.vae_encode(pixels)).max() <= TOL


def test_text_cache_wraps_the_onnxruntime_backend(export_dir, tmp_path):
    pipe = skyrt.load(export_dir, backend="onnxruntime", text_cache=tmp_path)
    first = pipe.backend.encode_text("a fox")
    again = pipe.backend.encode_text("a fox")
    assert pipe.backend.text_cache.cache.hits == 1 and np.array_equal(first.value, again.value)
    assert isinstance(again.value, np.ndarray)


# ---------------------------------------------------------------------------------------------
# No torch on the serving path


def test_serving_path_never_imports_torch(export_dir):
    script = textwrap.dedent(f"""
        import json, sys, warnings
        warnings.simplefilter("ignore")
        import skyrt
        pipe = skyrt.load({str(export_dir)!r}, backend="onnxruntime")
        chunks = list(pipe.stream("a fox", height=32, width=32, num_inference_steps=2, mode="kvcache", ar_step=1,
                                  sink_blocks=1, window_blocks=2, guidance_scale=3.0, seed=0, max_chunks=2))
        video = pipe.generate("a fox", num_frames=5, height=32, width=32, num_inference_steps=2, seed=0,
                              progress=False)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "diffusers"))
        print(json.dumps({{"frames": sum(len(c) for c in chunks) + len(video), "heavy": heavy}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["frames"] == 5 + 5 and report["heavy"] == []


# ---------------------------------------------------------------------------------------------
# A model folder: export on first use into the cache, reuse afterwards


def test_model_folder_is_exported_into_the_cache_once(model_dir, torch_pipe, tmp_path, monkeypatch):
    spec = inspect_model_folder(model_dir)
    backend = ob.OnnxRuntimeBackend(spec, cache_dir=tmp_path, progress=False)
    context = backend.encode_text("a red circle")  # exports the text group in a subprocess
    ref = torch_pipe.backend.encode_text("a red circle").value.numpy()
    assert np.abs(context.value - ref).max() <= TOL
    folders = list((tmp_path / "onnx").glob("*/text-*"))
    assert len(folders) == 1 and ob.is_export_folder(folders[0])
    assert set(ob.read_manifest(folders[0])["graphs"]) == {"text_encoder", "cross_kv"}

    def no_export(*args, **kwargs):
        raise AssertionError(f"exported again: {args}")

    monkeypatch.setattr(subprocess, "run", no_export)  # the exporter runs in a subprocess
    again = ob.OnnxRuntimeBackend(spec, cache_dir=tmp_path)
    assert np.array_equal(again.encode_text("a red circle").value, context.value)
    assert again.model_hash == backend.model_hash
    # another export setting is another cache entry
    with pytest.raises(AssertionError, match="exported again"):
        ob.OnnxRuntimeBackend(spec, cache_dir=tmp_path, precision="fp16").encode_text("x")


# ---------------------------------------------------------------------------------------------
# Refusals


def test_refuses_shapes_the_export_was_not_made_for(ort_pipe):
    with pytest.raises(ValueError, match="skyrt export onnx .*--height 48"):
        ort_pipe.generate("x", num_frames=5, height=48, width=32, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="cache_blocks"):
        _quiet(ort_pipe.generate, "x", num_frames=9, **SMALL, mode="kvcache", ar_step=1, window_blocks=5)


def test_refuses_a_gpu_provider_this_onnxruntime_lacks(export_dir):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        skyrt.load(export_dir, backend="onnxruntime", device="cuda")


def test_refuses_a_silent_cpu_fallback(export_dir, monkeypatch):
    """A session that asked for CUDA but came up on the CPU (what onnxruntime-gpu does when CUDA
    cannot start) is refused."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    class FellBack:
        def __init__(self, *args, **kwargs):
            pass

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", FellBack)
    backend = ob.OnnxRuntimeBackend(ob.export_folder_spec(export_dir), device="cuda")
    with pytest.raises(RuntimeError, match="silent fallback"):
        backend.encode_text("x")


def test_refuses_bf16(model_dir, tmp_path):
    """ORT's CPU provider has no bfloat16 MatMul: bf16 exports are for TensorRT engines only."""
    with pytest.raises(ValueError, match="no bfloat16 MatMul"):
        ob.OnnxRuntimeBackend(inspect_model_folder(model_dir), precision="bf16", cache_dir=tmp_path)
