"""The tiny decoder (export/tiny_vae.py, TAEHV's architecture) against TAEHV's own code, via the fixture
tests/tiny_vae_reference.py recorded from their taehv.py on seeded random weights; its streaming, its
loader of the released file layout, its ONNX step graph and a TensorRT-RTX build of it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from skyrt.export.tiny_vae import (MEMORY_SPECS, TinyDecoder, TinyDecoderFileError, TinyStreamingDecoder,  # noqa: E402
                                   decode_raw, export_tiny_decoder_onnx, find_tiny_decoder_file,
                                   load_tiny_decoder, step_io_names)
from skyrt.runtime.latents import denormalize  # noqa: E402

from tiny_vae_reference import FIXTURE, seeded_state  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def reference() -> dict:
    data = np.load(FIXTURE)
    out = {k: data[k] for k in ("z", "raw", "video", "streaming")}
    out["info"] = json.loads(str(data["info"]))
    return out


def their_shapes(reference) -> dict[str, tuple[int, ...]]:
    return {k: tuple(s) for k, s in reference["info"]["keys"].items()}


@pytest.fixture(scope="module")
def tiny(reference) -> TinyDecoder:
    """Ours with the fixture's weights: seeded_state over THEIR keys (decoder.* only are ours)."""
    state = seeded_state(their_shapes(reference))
    model = TinyDecoder()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items() if k.startswith("decoder.")})
    return model.eval()


def raw_mu(reference) -> torch.Tensor:
    """The fixture's model-space latents [1, T, 16, h, w] as skyrt's raw mu [1, 16, T, h, w]."""
    return denormalize(torch.from_numpy(reference["z"]).permute(0, 2, 1, 3, 4), channel_axis=1)


def test_our_decoder_keys_and_shapes_are_theirs(reference):
    theirs = {k: s for k, s in their_shapes(reference).items() if k.startswith("decoder.")}
    ours = {k: tuple(v.shape) for k, v in TinyDecoder().state_dict().items()}
    assert ours == theirs


def test_whole_clip_matches_their_decoder(tiny, reference):
    z = torch.from_numpy(reference["z"])  # [1, 3, 16, 2, 3]
    with torch.no_grad():
        raw, _ = tiny.run(z, tiny.zero_memories(1, 2, 3, z))
        video = tiny.decode_video(z)
    assert raw.shape == (1, 12, 3, 16, 24) and video.shape == (1, 9, 3, 16, 24)  # 4F raw, 1 + 4(F-1) kept
    assert np.abs(raw.numpy() - reference["raw"]).max() <= TOL
    assert np.abs(video.numpy() - reference["video"]).max() <= TOL
    unclamped = (reference["video"] > 0) & (reference["video"] < 1)
    assert 0.2 < unclamped.mean() < 0.9  # the fixture is not all clamped


def test_streaming_one_latent_at_a_time_matches_whole_clip_and_theirs(tiny, reference):
    mu = raw_mu(reference)  # [1, 16, 3, 2, 3]
    decoder = TinyStreamingDecoder(tiny)
    chunks = [decoder.decode_next(mu[:, :, t:t + 1]) for t in range(mu.shape[2])]
    assert [c.shape[2] for c in chunks] == [1, 4, 4]  # the Wan VAE's streaming counts
    streamed = torch.cat(chunks, 2)
    with torch.no_grad():
        whole = decode_raw(tiny, mu)  # [1, 3, 9, 16, 24] in [-1, 1]
    assert np.abs(streamed.numpy() - whole.numpy()).max() <= TOL
    theirs = reference["streaming"].transpose(0, 2, 1, 3, 4) * 2 - 1  # their [0, 1] NTCHW -> [-1, 1] NCTHW
    assert np.abs(streamed.numpy() - theirs).max() <= 2 * TOL
    decoder.reset()  # a new stream starts from empty memories
    again = decoder.decode_next(mu[:, :, :1])
    assert again.shape[2] == 1 and np.abs(again.numpy() - chunks[0].numpy()).max() == 0


def test_streaming_refuses_a_clip(tiny):
    with pytest.raises(ValueError, match=r"one raw latent frame \[1, 16, 1, h, w\]"):
        TinyStreamingDecoder(tiny).decode_next(torch.zeros(1, 16, 2, 2, 3))


@pytest.fixture(scope="module")
def released_state(reference) -> dict[str, torch.Tensor]:
    """A state dict in the released file's layout (their encoder.* and decoder.* keys)."""
    return {k: torch.from_numpy(v) for k, v in seeded_state(their_shapes(reference)).items()}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_the_released_file_layout(released_state, tiny, reference, tmp_path, suffix):
    path = tmp_path / f"taew2_1{suffix}"
    if suffix == ".pth":
        torch.save(released_state, path)
    else:
        from safetensors.torch import save_file

        save_file(released_state, str(path))
    assert find_tiny_decoder_file(tmp_path) == path
    loaded = load_tiny_decoder(path)
    z = torch.from_numpy(reference["z"])
    with torch.no_grad():
        assert np.abs(loaded.decode_video(z).numpy() - reference["video"]).max() <= TOL


def test_a_time_grow_weight_of_more_frames_keeps_its_last_channels(released_state, tiny, tmp_path):
    """TAEHV's loader (patch_tgrow_layers) cuts a TimeGrow weight trained to grow more frames to its
    last timestep's channels; decoder.7 (x1 in taew2_1) given as an x2 weight loads its second half."""
    state = dict(released_state)
    state["decoder.7.conv.weight"] = torch.cat([torch.randn_like(state["decoder.7.conv.weight"]),
                                                state["decoder.7.conv.weight"]])
    torch.save(state, tmp_path / "taew2_1.pth")
    loaded = load_tiny_decoder(tmp_path / "taew2_1.pth")
    assert torch.equal(loaded.state_dict()["decoder.7.conv.weight"], tiny.state_dict()["decoder.7.conv.weight"])


def test_wrong_files_are_named(released_state, tmp_path):
    wan = {"encoder.conv1.weight": torch.zeros(96, 3, 3, 3, 3), "decoder.conv1.weight": torch.zeros(384, 16, 3, 3, 3),
           "conv1.weight": torch.zeros(32, 32, 1, 1, 1)}
    torch.save(wan, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(TinyDecoderFileError, match="Wan2.1 VAE.*taew2_1.pth"):
        load_tiny_decoder(tmp_path / "Wan2.1_VAE.pth")
    wan22 = dict(released_state, **{"decoder.1.weight": torch.zeros(256, 48, 3, 3)})
    torch.save(wan22, tmp_path / "taew2_2.pth")
    with pytest.raises(TinyDecoderFileError, match="48-channel latents"):
        load_tiny_decoder(tmp_path / "taew2_2.pth")
    partial = {k: v for k, v in released_state.items() if k != "decoder.22.bias"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(TinyDecoderFileError, match=r"missing \['decoder.22.bias'\]"):
        load_tiny_decoder(tmp_path / "partial.pth")
    with pytest.raises(FileNotFoundError, match="taew2_1.safetensors, taew2_1.pth.*decoder_path="):
        find_tiny_decoder_file(tmp_path)


@pytest.fixture(scope="module")
def step_onnx(tiny, tmp_path_factory) -> Path:
    return export_tiny_decoder_onnx(tiny, tmp_path_factory.mktemp("tiny_onnx") / "tiny_decoder_step.onnx", 2, 3)


def test_onnx_step_graph_streams_like_torch(step_onnx, tiny, reference):
    """onnxruntime on the CPU runs the step graph three times, carrying the memories itself."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(step_onnx), providers=["CPUExecutionProvider"])
    inputs, outputs = step_io_names()
    assert [i.name for i in session.get_inputs()] == inputs and [o.name for o in session.get_outputs()] == outputs
    mu = raw_mu(reference).numpy()
    memories = [np.zeros(m.shape(1, 2, 3), np.float32) for m in MEMORY_SPECS]
    frames = []
    for t in range(mu.shape[2]):
        pixels, *memories = session.run(None, {"mu": mu[:, :, t:t + 1], **dict(zip(inputs[1:], memories))})
        frames.append(pixels[:, :, 3:] if t == 0 else pixels)
    streamed = TinyStreamingDecoder(tiny)
    expected = torch.cat([streamed.decode_next(torch.from_numpy(mu[:, :, t:t + 1])) for t in range(3)], 2).numpy()
    assert np.abs(np.concatenate(frames, 2) - expected).max() <= 1e-4


def test_tensorrt_rtx_builds_the_step_graph(step_onnx, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")
    from skyrt.export.engine import BuildOptions, GraphSpec, build_engines

    [engine] = build_engines([GraphSpec("tiny_decoder_step", step_onnx)], tmp_path,
                             BuildOptions(compute_capabilities=["8.9"]), progress=False)
    assert engine.stat().st_size > 10_000
    manifest = json.loads((tmp_path / "tiny_decoder_step.engine.json").read_text())
    assert manifest["builder"] == "tensorrt-rtx" and manifest["compute_capabilities"] == ["8.9"]


# ---- selection: skyrt.load(decoder="tiny"), the torch backend, the CLI flags -------------------------
SMALL = dict(height=32, width=32, num_inference_steps=2, shift=8.0, guidance_scale=1.0)


@pytest.fixture(scope="module")
def folder_with_tiny(official_dir, released_state, tmp_path_factory) -> Path:
    """The tiny official-layout model folder (links to its files) plus taew2_1.pth."""
    folder = tmp_path_factory.mktemp("with_tiny") / "model"
    folder.mkdir()
    for item in official_dir.iterdir():
        (folder / item.name).symlink_to(item)
    torch.save(released_state, folder / "taew2_1.pth")
    return folder


def test_load_with_the_tiny_decoder_decodes_with_it(folder_with_tiny, official_pipeline, tiny):
    import skyrt
    from skyrt.runtime.latents import denormalize as denorm_np

    pipe = skyrt.load(folder_with_tiny, decoder="tiny")
    z = official_pipeline.generate("x", num_frames=9, seed=5, output="latent", progress=False, **SMALL)
    frames = pipe.generate("x", num_frames=9, seed=5, progress=False, **SMALL)  # same DiT, same seed
    with torch.no_grad():
        video = decode_raw(tiny, torch.from_numpy(denorm_np(z))[None])[0]  # [3, 9, 32, 32] in [-1, 1]
    expected = ((video / 2 + 0.5).clamp(0, 1) * 255).permute(1, 2, 3, 0).numpy()
    assert frames.shape == (9, 32, 32, 3)  # the Wan VAE's frame count
    assert np.abs(frames.astype(np.float32) - np.floor(expected)).max() <= 1
    decoder = pipe.backend.streaming_decoder()
    mu = denorm_np(z)
    chunks = [decoder.decode_next(mu[:, t:t + 1]) for t in range(mu.shape[1])]
    assert [c.shape[1] for c in chunks] == [1, 4, 4]
    assert np.abs(np.concatenate(chunks, 1) - pipe.backend.vae_decode(mu)).max() <= TOL


def test_tiny_decoder_by_path_and_clear_errors(official_dir, folder_with_tiny):
    import skyrt

    pipe = skyrt.load(official_dir, decoder="tiny", decoder_path=folder_with_tiny / "taew2_1.pth")
    assert pipe.backend.tiny_decoder is not None
    with pytest.raises(FileNotFoundError, match="decoder='tiny' needs TAEHV's Wan2.1 decoder.*taew2_1.pth"):
        skyrt.load(official_dir, decoder="tiny")
    with pytest.raises(ValueError, match="decoder='vqgan': choose 'wan'"):
        skyrt.load(official_dir, decoder="vqgan")
    with pytest.raises(FileNotFoundError, match="decoder='tiny' needs TAEHV's Wan2.1 decoder"):
        skyrt.load(official_dir, backend="onnxruntime", decoder="tiny")
    try:
        import tensorrt_rtx  # noqa: F401  (the tensorrt backend takes decoder="tiny" too: its weights are looked for)
    except ImportError:
        return
    with pytest.raises(FileNotFoundError, match="decoder='tiny' needs TAEHV's Wan2.1 decoder"):
        skyrt.load(official_dir, backend="tensorrt", decoder="tiny", cache_dir=official_dir.parent / "trt-cache")


# ---- the exported-graph backends: the step graph as an export folder, onnxruntime with decoder="tiny" --
def test_export_cli_writes_the_step_graph_folder(folder_with_tiny, tmp_path):
    from skyrt.export.export_cli import main
    from skyrt.runtime.tiny_decoder import is_tiny_decoder_export, read_tiny_export

    out = tmp_path / "tiny"
    assert main(["onnx", "--tiny-decoder", str(folder_with_tiny / "taew2_1.pth"), "--height", "16", "--width", "24",
                 "--out", str(out)]) == 0
    manifest = read_tiny_export(out)
    assert is_tiny_decoder_export(out) and manifest["latent"] == [2, 3] and (out / manifest["graph"]["file"]).is_file()
    shapes = {s["name"]: s["shape"] for s in manifest["graph"]["inputs"] + manifest["graph"]["outputs"]}
    assert shapes["mu"] == [1, 16, 1, 2, 3] and shapes["pixels"] == [1, 3, 4, 16, 24]
    assert shapes["memory_8"] == shapes["new_memory_8"] == [1, 64, 8, 12]  # the carried memories, explicit I/O
    assert main(["onnx", "--tiny-decoder", str(folder_with_tiny / "taew2_1.pth"), "--out", str(out)]) == 2
    pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")
    from skyrt.runtime.engine_manifest import EngineManifest, file_sha256

    # `skyrt export engine` builds the folder's graph ahead of time with TensorRT-RTX (no GPU here; loading
    # it needs one) into an engine folder that --backend tensorrt --decoder tiny takes as --decoder-path.
    engines = tmp_path / "engine"
    assert main(["engine", "--onnx", str(out), "--out", str(engines), "--builder", "tensorrt-rtx",
                 "--compute-capability", "8.9", "--no-progress"]) == 0
    built = EngineManifest.read(engines / "tiny_decoder_step.engine.json")
    assert built.onnx_sha256 == file_sha256(out / manifest["graph"]["file"]) and built.compute_capabilities == ["8.9"]
    assert (engines / built.engine_file).stat().st_size > 10_000
    assert read_tiny_export(engines) == manifest  # the I/O the backend binds, beside the engine


def test_onnxruntime_backend_streams_the_tiny_decoder_like_torch(folder_with_tiny, tiny, reference, tmp_path):
    """decoder="tiny" on onnxruntime (CPU): its step graph (exported on first use) carried latent by latent
    on bound buffers == torch's whole-clip decode (fp32), and == the torch backend's streaming decoder."""
    from skyrt.runtime.api import source_spec
    from skyrt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(source_spec(folder_with_tiny, "onnxruntime"), cache_dir=tmp_path, progress=False,
                                 decoder="tiny")
    mu = raw_mu(reference)  # [1, 16, 3, 2, 3]
    with torch.no_grad():
        whole = decode_raw(tiny, mu)[0].numpy()  # [3, 9, 16, 24]
    decoder = backend.streaming_decoder()
    chunks = [decoder.decode_next(mu[0, :, t:t + 1].numpy()) for t in range(mu.shape[2])]
    assert [c.shape[1] for c in chunks] == [1, 4, 4]
    err = np.abs(np.concatenate(chunks, 1) - whole).max()
    assert err <= 1e-4, err
    decoder.reset()  # a new stream on the same buffers starts from zero memories again
    again = np.concatenate([decoder.decode_next(mu[0, :, t:t + 1].numpy()) for t in range(mu.shape[2])], 1)
    assert np.abs(again - whole).max() <= 1e-4
    assert np.abs(backend.vae_decode(mu[0].numpy()) - whole).max() <= 1e-4
    decoder.close()
    assert list((tmp_path / "tiny_decoder").glob("*/2x3/tiny_decoder.json"))  # exported once, into the cache


def test_onnxruntime_pipeline_with_the_tiny_decoder(folder_with_tiny, tmp_path, monkeypatch):
    """skyrt.load(..., backend="onnxruntime", decoder="tiny") generates frames decoded by the tiny graph:
    the same clip as the torch backend with decoder="tiny" (same seed; DiT graphs within 1e-4)."""
    import skyrt

    monkeypatch.setenv("SKYRT_CACHE", str(tmp_path))
    ort_pipe = skyrt.load(folder_with_tiny, backend="onnxruntime", decoder="tiny", progress=False)
    torch_pipe = skyrt.load(folder_with_tiny, decoder="tiny")
    frames = ort_pipe.generate("x", num_frames=9, seed=5, progress=False, **SMALL)
    expected = torch_pipe.generate("x", num_frames=9, seed=5, progress=False, **SMALL)
    assert frames.shape == expected.shape == (9, 32, 32, 3)
    assert np.abs(frames.astype(int) - expected).max() <= 2
    wan = skyrt.load(folder_with_tiny, backend="onnxruntime", progress=False)
    assert np.abs(wan.generate("x", num_frames=9, seed=5, progress=False, **SMALL).astype(int) - frames).mean() > 5


def test_onnxruntime_tiny_decoder_export_folder_of_another_size_is_refused(folder_with_tiny, tmp_path):
    from skyrt.export.export_cli import main
    from skyrt.runtime.api import source_spec
    from skyrt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    out = tmp_path / "tiny"
    assert main(["onnx", "--tiny-decoder", str(folder_with_tiny / "taew2_1.pth"), "--height", "16", "--width", "16",
                 "--out", str(out)]) == 0
    backend = OnnxRuntimeBackend(source_spec(folder_with_tiny, "onnxruntime"), cache_dir=tmp_path, progress=False,
                                 decoder="tiny", decoder_path=out)
    assert backend.streaming_decoder().decode_next(np.zeros((16, 1, 2, 2), np.float32)).shape == (3, 1, 16, 16)
    with pytest.raises(ValueError, match="is for 16x16 pixels, the stream is 16x24.*--height 16 --width 24"):
        backend.streaming_decoder().decode_next(np.zeros((16, 1, 2, 3), np.float32))
    with pytest.raises(ValueError, match="not a tiny decoder export"):
        OnnxRuntimeBackend(source_spec(folder_with_tiny, "onnxruntime"), cache_dir=tmp_path, decoder="tiny",
                           decoder_path=tmp_path)


def test_cli_decoder_flags_reach_load():
    from skyrt.runtime.cli import _decoder_kwargs, build_parser

    args = build_parser().parse_args(["generate", "--decoder", "tiny", "--decoder-path", "/m/taew2_1.pth"])
    assert _decoder_kwargs(args) == {"decoder": "tiny", "decoder_path": "/m/taew2_1.pth"}
    assert _decoder_kwargs(build_parser().parse_args(["serve"])) == {}
