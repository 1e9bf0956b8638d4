"""Where users meet the captioner: open_captioner (export folder or checkpoint, exported once into the
cache), `skyrt caption`, `skyrt export onnx --captioner`, `skyrt generate --video` without a prompt
and `skyrt serve --captioner --caption-every`.

A tiny random Qwen2.5-VL writes noise, so the error path runs the real model; the success paths
replace only the generated text (Captioner.generate_frames) with a hand-written valid answer.

    python -m pytest tests/test_captioner_cli.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("av")

from captioner_checkpoints import VALID_CAPTION, valid_caption_text, write_clip, write_tiny_checkpoint  # noqa: E402

from skyrt.runtime import captioner as rc  # noqa: E402
from skyrt.runtime.caption_schema import parse_caption, to_t2v_prompt  # noqa: E402
from skyrt.runtime.cli import DEFAULT_PROMPT, main  # noqa: E402

NEW_TOKENS = "8"  # the random model's garbage needs no more to fail parsing


@pytest.fixture(autouse=True)
def _no_user_captioner(monkeypatch, tmp_path):
    """Tests see neither the user's $SKYRT_CAPTIONER nor their cache."""
    monkeypatch.delenv("SKYRT_CAPTIONER", raising=False)
    monkeypatch.setenv("SKYRT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("captioner"))


@pytest.fixture(scope="module")
def onnx_dir(tiny_dir, tmp_path_factory) -> Path:
    """The export every caption test uses, made by the command users run."""
    out = tmp_path_factory.mktemp("captioner-onnx") / "onnx"
    assert main(["export", "onnx", "--captioner", str(tiny_dir), "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


@pytest.fixture
def valid_model_output(monkeypatch) -> list:
    """Captioner.generate_frames answers VALID_CAPTION; returns the frame arrays it was given."""
    seen = []

    def generate_frames(self, frames, text=None, fps=rc.OFFICIAL_FPS, max_new_tokens=2048):
        seen.append(frames)
        return rc.GenerationResult(tokens=[0], text=valid_caption_text(), stop_reason="eos", prompt_tokens=0)

    monkeypatch.setattr(rc.Captioner, "generate_frames", generate_frames)
    return seen


# ----------------------------------------------------------------------------------------------
# open_captioner


def test_open_captioner_on_an_export_folder(onnx_dir):
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert manifest["format"] == rc.MANIFEST_FORMAT
    assert sorted(manifest["graphs"]) == ["decoder_decode", "decoder_prefill", "vision"]
    captioner = rc.open_captioner(onnx_dir, threads=1)
    assert isinstance(captioner, rc.Captioner) and captioner.dir == onnx_dir


def test_open_captioner_exports_a_checkpoint_once_into_the_cache(tiny_dir, onnx_dir, tmp_path, monkeypatch, capfd):
    exports = []
    from skyrt.runtime import artifact_cache

    real_export = artifact_cache.run_exporter
    monkeypatch.setattr(artifact_cache, "run_exporter", lambda *a: exports.append(a) or real_export(*a))
    first = rc.open_captioner(tiny_dir, threads=1)  # $SKYRT_CACHE: tmp_path / "cache" (fixture)
    assert len(exports) == 1
    assert first.dir.parent.parent == tmp_path / "cache" / "captioner"  # <cache>/captioner/<hash>/<settings>
    assert "exporting the captioner" in capfd.readouterr().err  # the first use says what it is doing
    stamp = (first.dir / "manifest.json").stat().st_mtime_ns
    second = rc.open_captioner(tiny_dir, threads=1, progress=False)
    assert len(exports) == 1 and second.dir == first.dir
    assert (second.dir / "manifest.json").stat().st_mtime_ns == stamp
    assert not [p for p in first.dir.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    # The cached export is the same model as the one `skyrt export onnx --captioner` wrote.
    frames = np.zeros((4, 56, 84, 3), np.uint8)
    assert (first.generate_frames(frames, max_new_tokens=4).tokens
            == rc.Captioner(onnx_dir, threads=1).generate_frames(frames, max_new_tokens=4).tokens)


def test_checkpoint_without_torch_says_to_install_the_export_extra(tiny_dir, clip, monkeypatch, capsys):
    from skyrt.runtime.captioner import first_use_export

    monkeypatch.setattr(first_use_export, "missing_export_modules", lambda: ["torch"])
    with pytest.raises(rc.CaptionerSetupError, match=r"missing here: torch.*skyrt\[export\].*--captioner"):
        rc.open_captioner(tiny_dir)
    assert main(["caption", str(clip), "--captioner", str(tiny_dir)]) == 2
    assert "pip install 'skyrt[export]'" in capsys.readouterr().err


def test_folders_that_are_not_captioners_are_refused_with_what_was_expected(tiny_dir, tmp_path, clip, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    video_model = tmp_path / "dit"
    video_model.mkdir()
    (video_model / "config.json").write_text(json.dumps({"model_type": "df", "dim": 1536}))
    dit_export = tmp_path / "dit-onnx"
    dit_export.mkdir()
    (dit_export / "manifest.json").write_text(json.dumps({"format": "skyrt-onnx"}))
    cases = [(tmp_path / "nowhere", FileNotFoundError, "does not exist"),
             (empty, ValueError, "neither manifest.json nor config.json"),
             (video_model, ValueError, "model_type 'df'"),
             (dit_export, ValueError, "'skyrt-onnx' export, not a captioner export")]
    for folder, error, message in cases:
        with pytest.raises(error, match=message) as err:
            rc.open_captioner(folder)
        assert "SkyCaptioner-V1 checkpoint folder" in str(err.value)  # ... and what to pass instead
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (incomplete / name).write_bytes((tiny_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="missing: tokenizer_config.json; preprocessor_config.json"):
        rc.open_captioner(incomplete)
    assert main(["caption", str(clip), "--captioner", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("skyrt caption: error:") and "skyrt export onnx --captioner" in err


# ----------------------------------------------------------------------------------------------
# skyrt caption


def test_caption_of_a_random_model_exits_2_and_shows_the_raw_text(onnx_dir, clip, capsys):
    code = main(["caption", str(clip), "--captioner", str(onnx_dir), "--max-new-tokens", NEW_TOKENS, "--threads", "2"])
    assert code == 2
    err = capsys.readouterr().err
    raw = rc.Captioner(onnx_dir, threads=2).generate_frames(rc.read_video_frames(clip), max_new_tokens=8).text
    assert raw.strip() and "raw output:\n" + raw in err


def test_caption_prints_the_t2v_prompt_or_the_json(onnx_dir, clip, capsys, monkeypatch, valid_model_output):
    assert main(["caption", str(clip), "--captioner", str(onnx_dir)]) == 0
    out = capsys.readouterr().out
    expected = to_t2v_prompt(parse_caption(valid_caption_text()))
    assert out == expected + "\n" and expected.startswith("Full shot, high angle, side view. Dog: It runs")
    # The official reading: 16 frames at 420x360 (height x width), whatever the clip's size.
    assert valid_model_output[0].shape == (16, 420, 360, 3)
    monkeypatch.setenv("SKYRT_CAPTIONER", str(onnx_dir))  # the default when --captioner is not given
    assert main(["caption", str(clip), "--json", "--strict"]) == 0
    assert json.loads(capsys.readouterr().out) == VALID_CAPTION


def test_caption_strict_refuses_schema_issues(onnx_dir, clip, capsys, monkeypatch):
    partial = {k: v for k, v in VALID_CAPTION.items() if k != "lighting"} | {"shot_angle": "dutch_angle"}
    monkeypatch.setattr(rc.Captioner, "generate_frames", lambda self, frames, **kw: rc.GenerationResult(
        tokens=[0], text=json.dumps(partial), stop_reason="eos", prompt_tokens=0))
    assert main(["caption", str(clip), "--captioner", str(onnx_dir)]) == 0
    captured = capsys.readouterr()
    assert "warning: missing lighting" in captured.err
    assert captured.out == to_t2v_prompt(parse_caption(json.dumps(partial))) + "\n"
    assert main(["caption", str(clip), "--captioner", str(onnx_dir), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "dutch_angle" in err and "raw output:\n" + json.dumps(partial) in err


def test_caption_needs_a_captioner_and_a_video(clip, tmp_path, capsys):
    assert main(["caption", str(clip)]) == 2
    err = capsys.readouterr().err
    assert "pass --captioner DIR" in err and "SKYRT_CAPTIONER" in err and "does not download" in err
    assert main(["caption", str(tmp_path / "missing.mp4"), "--captioner", str(tmp_path)]) == 2
    assert "missing.mp4 not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# skyrt export


def test_export_onnx_captioner_flags_and_engine_build(onnx_dir, tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse: --model and --captioner are exclusive
        main(["export", "onnx", "--model", str(tiny_dir), "--captioner", str(tiny_dir), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["export", "onnx", "--captioner", str(tiny_dir), "--out", str(tmp_path / "x"), "--height", "64"]) == 2
    assert "--height shape(s) the video model's graphs" in capsys.readouterr().err
    assert main(["export", "onnx", "--captioner", str(tiny_dir), "--out", str(tmp_path / "x"), "--precision",
                 "bf16"]) == 2  # bf16 is a DiT precision
    assert "the captioner exports fp32 or fp16" in capsys.readouterr().err
    pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")
    engines = tmp_path / "engines"
    assert main(["export", "engine", "--onnx", str(onnx_dir), "--out", str(engines), "--compute-capability", "8.9",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in engines.glob("*.engine")) == [
        "decoder_decode.engine", "decoder_prefill.engine", "vision.engine"]


# ----------------------------------------------------------------------------------------------
# skyrt generate --video without --prompt, skyrt serve --captioner


def _spy_generate(monkeypatch, call_through: bool) -> list:
    """Record the prompt skyrt generate hands the pipeline (optionally skipping the generation)."""
    from skyrt.runtime.pipeline import Pipeline

    prompts, real = [], Pipeline.generate

    def generate(self, request, **inputs):  # the CLI hands the pipeline its resolved request
        prompts.append(request.prompt)
        return real(self, request=request, **inputs) if call_through else np.zeros((9, 32, 32, 3), np.uint8)

    monkeypatch.setattr(Pipeline, "generate", generate)
    return prompts


def test_generate_video_without_prompt_uses_its_caption(official_dir, onnx_dir, clip, tmp_path, capsys, monkeypatch,
                                                        valid_model_output):
    prompts = _spy_generate(monkeypatch, call_through=True)
    small = ["--model", str(official_dir), "--height", "32", "--width", "32", "--steps", "2", "--seed", "0",
             "--no-progress"]
    code = main(["generate", *small, "--video", str(clip), "--captioner", str(onnx_dir), "--num-frames", "13",
                 "--base-num-frames", "9", "--overlap-history", "5", "--output", str(tmp_path / "v2v.mp4")])
    assert code == 0
    expected = to_t2v_prompt(parse_caption(valid_caption_text()))
    assert prompts == [expected]
    assert f"caption of {clip}): {expected}" in capsys.readouterr().out
    # No --video: the usual default prompt, and no captioner is needed (the generation itself is
    # test_pipeline's business: skipped here).
    prompts = _spy_generate(monkeypatch, call_through=False)
    assert main(["generate", *small, "--num-frames", "9", "--output", str(tmp_path / "t2v.mp4")]) == 0
    assert prompts == [DEFAULT_PROMPT]


def test_generate_video_without_prompt_or_captioner_is_refused(clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("skyrt.runtime.cli._load", lambda args: pytest.fail("loaded the model before refusing"))
    assert main(["generate", "--video", str(clip), "--output", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "--video without --prompt" in err and "--prompt TEXT" in err and "--captioner DIR" in err


def test_serve_passes_a_live_captioner(official_dir, onnx_dir, capsys, monkeypatch):
    import skyrt.runtime.server as server

    calls = []
    monkeypatch.setattr(server, "serve", lambda pipe, sampling, config, **kw: calls.append(kw))
    base = ["serve", "--model", str(official_dir)]
    assert main([*base, "--captioner", str(onnx_dir), "--caption-every", "5"]) == 0
    assert isinstance(calls[0]["captioner"], rc.Captioner) and calls[0]["caption_every_s"] == 5.0
    assert main([*base, "--captioner", str(onnx_dir)]) == 0
    assert calls[1]["caption_every_s"] == 30.0
    assert main(base) == 0
    assert "captioner" not in calls[2]  # no captioning unless asked for
    monkeypatch.setattr("skyrt.runtime.cli._load", lambda args: pytest.fail("loaded the model before refusing"))
    assert main([*base, "--caption-every", "5"]) == 2
    assert "--caption-every needs a captioner: pass --captioner DIR" in capsys.readouterr().err
    assert main([*base, "--captioner", str(onnx_dir), "--caption-every", "0"]) == 2
    assert "positive number of seconds" in capsys.readouterr().err
    assert len(calls) == 3


# ----------------------------------------------------------------------------------------------
# The TensorRT captioner backend, up to the GPU (its engine runs are unexecuted here)
def test_tensorrt_captioner_builds_engines_on_first_use_then_needs_a_gpu(onnx_dir, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")
    from skyrt.runtime import cuda_mem
    from skyrt.runtime.captioner.tensorrt_backend import CAPTIONER_ENGINES, read_captioner_engines

    if cuda_mem.device_count() > 0:
        pytest.skip("a GPU is present: benchmarks/gpu_validate.py runs the engines")
    cache = tmp_path / "cache"
    with pytest.raises(cuda_mem.CudaError):
        rc.open_captioner(onnx_dir, backend="tensorrt", cache_dir=cache, progress=False)
    [folder] = [p for p in (cache / "engines").glob("*/captioner-*") if p.is_dir()]
    manifest, engines, builder = read_captioner_engines(folder)
    assert builder == "tensorrt-rtx" and set(engines) == set(CAPTIONER_ENGINES)
    onnx_manifest = rc.read_manifest(onnx_dir)
    for entry in ("tokenizer", "embeddings"):  # what the host side reads beside the engines
        assert (folder / onnx_manifest[entry]["file"]).is_file()
    assert rc.read_manifest(folder) == onnx_manifest  # an engine folder reads like its export
    built = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.engine")}
    with pytest.raises(cuda_mem.CudaError):  # the engine folder itself, and the cache again: no rebuild
        rc.Captioner(folder, backend="tensorrt")
    with pytest.raises(cuda_mem.CudaError):
        rc.open_captioner(onnx_dir, backend="tensorrt", cache_dir=cache, progress=False)
    with pytest.raises(cuda_mem.CudaError):  # Captioner given the export finds the same cached engines
        rc.Captioner(onnx_dir, backend="tensorrt", cache_dir=cache, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.engine")} == built
    assert len([p for p in (cache / "engines").glob("*/captioner-*") if p.is_dir()]) == 1
    from skyrt.runtime.captioner.tensorrt_backend import captioner_engine_folder

    with pytest.raises(FileNotFoundError, match="neither a captioner engine folder .* nor a captioner export"):
        captioner_engine_folder(folder.parent, cache)


def test_tensorrt_captioner_refuses_incomplete_or_foreign_engine_folders(onnx_dir, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")
    import json
    import shutil

    from skyrt.runtime.captioner.tensorrt_backend import captioner_engines_for, read_captioner_engines

    folder = captioner_engines_for(onnx_dir, tmp_path / "cache", progress=False)
    with pytest.raises(FileNotFoundError, match="not a captioner engine folder"):
        read_captioner_engines(onnx_dir)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "vision.engine.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks the vision engine"):
        read_captioner_engines(broken)
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    copy = json.loads((foreign / "onnx_manifest.json").read_text())
    entry = copy["graphs"]["decoder_prefill"]
    entry["sha256"][entry["file"]] = "0" * 64
    (foreign / "onnx_manifest.json").write_text(json.dumps(copy))
    with pytest.raises(ValueError, match="built from another export of decoder_prefill"):
        read_captioner_engines(foreign)


# ----------------------------------------------------------------------------------------------
# The TensorRT captioner's host logic, driven with onnxruntime sessions standing in for engines and a
# numpy array standing in for GPU memory: the ping-pong K/V bookkeeping must give ORT's tokens.
@pytest.fixture(scope="module")
def captioner_engines(onnx_dir, tmp_path_factory) -> Path:
    pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")
    from skyrt.runtime.captioner.tensorrt_backend import captioner_engines_for

    return captioner_engines_for(onnx_dir, tmp_path_factory.mktemp("trt-cache"), progress=False)


class FakeDevice:
    """Bytes standing in for GPU memory: a DeviceArray's ptr is an offset into them."""

    def __init__(self, nbytes: int):
        # Random bytes: a read of anything not written first shows up as garbage tokens.
        self.memory = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)

    def read(self, arr) -> np.ndarray:
        return self.memory[arr.ptr:arr.ptr + arr.nbytes].view(arr.dtype).reshape(arr.shape)

    def write(self, arr, value: np.ndarray) -> None:
        self.memory[arr.ptr:arr.ptr + arr.nbytes] = np.ascontiguousarray(value, arr.dtype).view(np.uint8).reshape(-1)


class OrtAsEngine:
    """TrtEngine's run contract over an onnxruntime session and FakeDevice memory."""

    def __init__(self, session, device: FakeDevice):
        self.session, self.device = session, device
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]
        self.calls: list[dict] = []

    def run(self, feeds: dict, keep_on_device=(), out=None) -> list:
        from skyrt.runtime.cuda_mem import DeviceArray

        self.calls.append({k: (v.ptr, v.shape) for k, v in feeds.items() if isinstance(v, DeviceArray)})
        host = {k: self.device.read(v) if isinstance(v, DeviceArray) else v for k, v in feeds.items()}
        results = []
        for name, value in zip(self.outputs, self.session.run(self.outputs, host)):
            if out and name in out:
                view = DeviceArray(value.shape, out[name].dtype, out[name].ptr)
                assert view.nbytes <= out[name].nbytes
                self.device.write(view, value)
                value = view
            results.append(value)
        return results


def _wired_trt_backend(onnx_dir: Path, engine_dir: Path):
    """A TrtCaptionerBackend whose engines are onnxruntime sessions over FakeDevice memory."""
    from skyrt.runtime.captioner.tensorrt_backend import (KVPingPong, TrtCaptionerBackend, kv_capacity,
                                                           read_captioner_engines)
    from skyrt.runtime.cuda_mem import DeviceArray

    onnx_manifest, manifests, _ = read_captioner_engines(engine_dir)
    ort = rc.OrtCaptionerBackend(onnx_dir, onnx_manifest)
    cfg, dtype = onnx_manifest["captioner"], np.float32
    size = KVPingPong.set_bytes(cfg["num_layers"], cfg["num_kv_heads"], kv_capacity(manifests), cfg["head_dim"], dtype)
    device = FakeDevice(64 + 2 * size)
    bases = (DeviceArray((size,), np.uint8, 64), DeviceArray((size,), np.uint8, 64 + size))
    engines = {"vision": OrtAsEngine(ort.vision_session, device),
               "decoder_prefill": OrtAsEngine(ort.decoder_session, device),
               "decoder_decode": OrtAsEngine(ort.decoder_session, device)}
    backend = TrtCaptionerBackend.__new__(TrtCaptionerBackend)
    backend._wire(engines, manifests, onnx_manifest, bases, dtype)
    return backend, engines, bases


def test_tensorrt_captioner_host_logic_gives_onnxruntimes_tokens(onnx_dir, captioner_engines):
    backend, engines, bases = _wired_trt_backend(onnx_dir, captioner_engines)
    cap_ort, cap_trt = rc.Captioner(onnx_dir), rc.Captioner(onnx_dir, backend=backend)
    height, width = cap_ort.manifest["export_config"]["frame_size"]
    frames = np.random.default_rng(1).integers(0, 256, (16, height, width, 3), dtype=np.uint8)
    want = cap_ort.generate_frames(frames, max_new_tokens=6)
    got = cap_trt.generate_frames(frames, max_new_tokens=6)
    assert got.tokens == want.tokens and len(got.tokens) == 6
    # Prefill read 0 past tokens from set 0; decode steps alternate sets with one more token each.
    prefill, decodes = engines["decoder_prefill"].calls, engines["decoder_decode"].calls
    assert len(prefill) == 1 and len(decodes) == 5
    assert prefill[0]["past_key_0"] == (bases[0].ptr, (1, backend.kv.kv_heads, 0, backend.kv.head_dim))
    prompt = got.prompt_tokens
    for step, call in enumerate(decodes):
        ptr, shape = call["past_key_0"]
        assert ptr == bases[(step + 1) % 2].ptr and shape[2] == prompt + step
    assert len({ptr for call in decodes for ptr, _ in call.values()}) == 2 * 2 * backend.num_layers


def test_tensorrt_captioner_refuses_stale_caches_and_sizes_its_engines_do_not_take(onnx_dir, captioner_engines):
    from skyrt.runtime.captioner.tensorrt_backend import kv_capacity, profile_violations

    backend, _, _ = _wired_trt_backend(onnx_dir, captioner_engines)
    manifest = rc.read_manifest(onnx_dir)
    assert kv_capacity(backend.manifests) == manifest["export_config"]["max_total_tokens"] == backend.kv.capacity
    hidden = manifest["captioner"]["hidden_size"]
    first = backend.empty_cache()
    _, cache = backend.decoder(np.zeros((1, 3, hidden), np.float32), np.zeros((3, 1, 3), np.int64), first)
    _, newer = backend.decoder(np.zeros((1, 1, hidden), np.float32), np.full((3, 1, 1), 3, np.int64), cache)
    assert (cache.tokens, newer.tokens, newer.slot) == (3, 4, 0)
    with pytest.raises(ValueError, match="overwritten by a later decoder call"):
        backend.decoder(np.zeros((1, 1, hidden), np.float32), np.full((3, 1, 1), 3, np.int64), cache)
    full = type(newer)(slot=newer.slot, tokens=backend.kv.capacity, serial=newer.serial)
    with pytest.raises(ValueError, match="do not fit the decoder engines"):
        backend.decoder(np.zeros((1, 1, hidden), np.float32), np.zeros((3, 1, 1), np.int64), full)
    # The vision engine's profile pins the export's video size: an image is refused, naming that size.
    cap = rc.Captioner(onnx_dir, backend=backend)
    pixels, grid = rc.preprocess_image(np.zeros((56, 56, 3), np.uint8), cap.config.preprocess)
    with pytest.raises(ValueError, match=r"takes only the video size fixed at export: grid .* pixel_values"):
        backend.vision(rc.vision_inputs(pixels, [grid], cap.config))
    profile = {"x": [[1, 0, 4], [1, 8, 4], [1, 16, 4]]}
    assert profile_violations(profile, {"x": (1, 16, 4), "static": (9,)}) == []
    assert profile_violations(profile, {"x": (1, 17, 4)}) == ["x [1, 17, 4] not within [1, 0, 4]..[1, 16, 4]"]
    assert profile_violations(profile, {"x": (1, 4)}) != []


def test_tensorrt_captioner_never_imports_torch(captioner_engines):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import json, sys
        from skyrt.runtime.captioner import open_captioner
        from skyrt.runtime.cuda_mem import CudaError, device_count
        try:
            open_captioner({str(captioner_engines)!r}, backend="tensorrt")
            error = None
        except CudaError as err:
            error = str(err)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx"))
        print(json.dumps({{"error": error, "gpus": device_count(), "heavy": heavy}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [] and (report["gpus"] > 0 or "no usable NVIDIA driver" in report["error"])
