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
    real_export = rc._export_checkpoint
    monkeypatch.setattr(rc, "_export_checkpoint", lambda *a: exports.append(a) or real_export(*a))
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
    monkeypatch.setattr(rc, "missing_export_modules", lambda: ["torch"])
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

    def generate(self, prompt, **kwargs):
        prompts.append(prompt)
        return real(self, prompt, **kwargs) if call_through else np.zeros((9, 32, 32, 3), np.uint8)

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
    from skyrt.runtime.backends.tensorrt_captioner import CAPTIONER_ENGINES, read_captioner_engines

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
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.engine")} == built


def test_tensorrt_captioner_refuses_incomplete_or_foreign_engine_folders(onnx_dir, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")
    import json
    import shutil

    from skyrt.runtime.backends.tensorrt_captioner import captioner_engines_for, read_captioner_engines

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
