"""SkyCaptioner-V1 (Qwen2.5-VL) export and torch-free runtime against transformers as the oracle.

A tiny random Qwen2.5-VL is written in the real folder layout, exported to ONNX, and run by
skyrt.runtime.captioner with onnxruntime on the CPU. transformers' Qwen2_5_VLForConditionalGeneration,
its PIL image processor, get_rope_index and generate() are the references.

    python -m pytest tests/test_captioner.py -q
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from skyrt.export.captioner.export import export_captioner_onnx  # noqa: E402
from skyrt.export.captioner.loader import CaptionerFolderError, inspect_captioner_folder, load_captioner  # noqa: E402
from skyrt.export.captioner.tiny import write_tiny_captioner  # noqa: E402
from skyrt.runtime import captioner as rc  # noqa: E402
from skyrt.runtime.caption_schema import CaptionParseError  # noqa: E402

FRAME_SIZE = (112, 140)  # (height, width) of the test frames: grid 8x10 patches, 4x5 merged, 2x3 windows
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_captioner(tmp_path_factory.mktemp("captioner") / "SkyCaptioner-tiny")


@pytest.fixture(scope="module")
def checkpoint(tiny_dir):
    return load_captioner(tiny_dir)


@pytest.fixture(scope="module")
def onnx_dir(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("captioner-onnx")
    export_captioner_onnx(None, out, "fp32", progress=False, frame_size=FRAME_SIZE, checkpoint=checkpoint)
    return out


@pytest.fixture(scope="module")
def captioner(onnx_dir) -> rc.Captioner:
    return rc.Captioner(onnx_dir, threads=2)


def _frames(count: int, size=FRAME_SIZE, seed: int = 0) -> np.ndarray:
    """Smooth random frames (low-frequency noise), so resizing has structure to preserve."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, size[0] // 8 + 1, size[1] // 8 + 1, 3)).astype(np.float64)
    frames = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, : size[0], : size[1]]
    return (frames + rng.normal(0, 8, frames.shape)).clip(0, 255).astype(np.uint8)


def _image_processor(tiny_dir):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(tiny_dir))


# ----------------------------------------------------------------------------------------------
# Loader


def test_loader_names_every_missing_file(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    for name in ("preprocessor_config.json", "chat_template.json", "model-00002-of-00009.safetensors"):
        (broken / name).unlink()
    tok_cfg = json.loads((broken / "tokenizer_config.json").read_text())
    assert "chat_template" not in tok_cfg
    with pytest.raises(CaptionerFolderError) as err:
        inspect_captioner_folder(broken)
    message = str(err.value)
    for expected in ("preprocessor_config.json", "chat template", "model-00002-of-00009.safetensors"):
        assert expected in message
    config = json.loads((tiny_dir / "config.json").read_text())
    shutil.copytree(tiny_dir, tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps(config | {"model_type": "llava"}))
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        inspect_captioner_folder(tmp_path / "other")


# ----------------------------------------------------------------------------------------------
# Preprocessing against transformers' processor


@pytest.mark.parametrize("size", [(100, 150), (420, 360), (56, 56), (30, 200), (112, 168), (700, 90)])
def test_image_preprocessing_equals_transformers(tiny_dir, captioner, size):
    image = _frames(1, size, seed=size[0])[0]
    expected = _image_processor(tiny_dir)(images=[image], return_tensors="np")
    pixels, grid = rc.preprocess_image(image, captioner.config.preprocess)
    assert [list(grid)] == expected["image_grid_thw"].tolist()
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, expected["pixel_values"])  # bit-exact


def test_video_preprocessing_interleaves_frames_like_transformers(tiny_dir, captioner):
    """The video layout from the image processor's (the oracle's) per-frame rows: a video row holds
    frames 2g and 2g+1 of one patch in its temporal slots, where the image processor repeats one."""
    frames = _frames(5, (100, 150))  # odd count: the last frame is repeated, as the video processor does
    pixels, grid = rc.preprocess_video(frames, captioner.config.preprocess)
    proc = _image_processor(tiny_dir)
    per_frame = [proc(images=[f], return_tensors="np")["pixel_values"] for f in list(frames) + [frames[-1]]]
    rows = grid[1] * grid[2]
    assert grid == (3, 8, 10) and pixels.shape == (3 * rows, 3 * 2 * 14 * 14)
    for g in range(grid[0]):
        a = per_frame[2 * g].reshape(rows, 3, 2, 14, 14)
        b = per_frame[2 * g + 1].reshape(rows, 3, 2, 14, 14)
        expected = np.stack([a[:, :, 0], b[:, :, 0]], axis=2).reshape(rows, -1)
        np.testing.assert_array_equal(pixels[g * rows:(g + 1) * rows], expected)


def test_video_preprocessing_equals_transformers_video_processor(tiny_dir, captioner):
    pytest.importorskip("torchvision", reason="transformers' video processor needs torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    pre = captioner.config.preprocess
    proc = Qwen2VLVideoProcessor(min_pixels=pre.min_pixels, max_pixels=pre.max_pixels, do_resize=False)
    frames = _frames(4, (112, 140))  # already at its smart size: no resize kernel differences
    expected = proc(videos=[frames], return_tensors="np", cap_pixels_per_frame=False)
    pixels, grid = rc.preprocess_video(frames, pre)
    assert [list(grid)] == expected["video_grid_thw"].tolist()
    np.testing.assert_allclose(pixels, expected["pixel_values_videos"], atol=1e-6)


def test_frame_sampling_and_video_reading(tmp_path):
    av = pytest.importorskip("av")
    assert rc.sample_frame_indices(33, 16) == [round(i * 2) for i in range(16)]
    assert rc.sample_frame_indices(5, 16) == [min(int(np.round(i * 4 / 16)), 4) for i in range(16)]
    path = tmp_path / "count.mkv"
    with av.open(str(path), "w") as container:  # lossless, so each frame's value survives
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "bgr0"
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 5 * i, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    frames = rc.read_video_frames(path, 16, size=None)
    assert frames.shape == (16, 48, 64, 3)
    assert [int(f[0, 0, 0]) // 5 for f in frames] == rc.sample_frame_indices(40, 16)
    assert rc.read_video_frames(path).shape == (16, 420, 360, 3)  # the official reader's size


# ----------------------------------------------------------------------------------------------
# Host-side tables against transformers


@pytest.mark.parametrize("grid", [(8, 8, 10), (1, 14, 10), (2, 6, 6), (1, 4, 12)])
def test_vision_tables_match_transformers(checkpoint, captioner, grid):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    visual = checkpoint.model.model.visual
    grid_t = torch.tensor([grid])
    cfg = visual.config
    index, cu = get_vision_window_index(grid_t, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
    unit = cfg.spatial_merge_size ** 2
    tokens = (index[:, None] * unit + torch.arange(unit)).reshape(-1).numpy()
    expected = [tokens[a:b] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    windows, frames = rc.vision_segments([grid], cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
    assert len(windows) == len(expected)
    for mine, theirs in zip(windows, expected):
        np.testing.assert_array_equal(mine, theirs)
    assert [len(f) for f in frames] == [grid[1] * grid[2]] * grid[0]
    positions = get_vision_position_ids(grid_t, cfg.spatial_merge_size)
    cos, sin = visual.rotary_pos_emb(torch.zeros(1), positions)
    my_cos, my_sin = rc.vision_rotary([grid], cfg.spatial_merge_size, np.asarray(captioner.config.vision_inv_freq))
    np.testing.assert_allclose(my_cos, cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(my_sin, sin.numpy(), atol=1e-6)


def _rope_case(captioner, kind: str, grid, second_per_grid: float = 1.0):
    cfg = captioner.config
    item = rc.VisionItem(kind, grid, second_per_grid)
    ids = rc.expand_vision_tokens(captioner.prompt_ids("Describe this.", kind), [item], cfg)
    return item, ids


@pytest.mark.parametrize("kind,grid,spg", [("image", (1, 14, 10), 1.0), ("video", (2, 8, 10), 1.0),
                                           ("video", (8, 8, 10), 1.0), ("video", (4, 6, 6), 0.5)])
def test_mrope_positions_match_get_rope_index(checkpoint, captioner, kind, grid, spg):
    item, ids = _rope_case(captioner, kind, grid, spg)
    cfg = captioner.config
    ids_t = torch.from_numpy(ids)[None]
    mm = torch.zeros_like(ids_t)
    mm[ids_t == cfg.image_token_id] = 1
    mm[ids_t == cfg.video_token_id] = 2
    kwargs = ({"image_grid_thw": torch.tensor([grid])} if kind == "image" else
              {"video_grid_thw": torch.tensor([grid]), "second_per_grid_ts": torch.tensor([spg])})
    expected, delta = checkpoint.model.model.get_rope_index(ids_t, mm, **kwargs)
    mine, my_delta = rc.mrope_positions(ids, [item], cfg, text_offset="transformers5")
    np.testing.assert_array_equal(mine, expected[:, 0].numpy())
    assert my_delta == int(delta)
    # Qwen's original convention (and vLLM's) agrees whenever the temporal span stays under the
    # spatial side; the 8-frame-group case here does not, and must differ exactly after the block.
    qwen, qwen_delta = rc.mrope_positions(ids, [item], cfg, text_offset="qwen")
    merge = cfg.preprocess.merge_size
    temporal_span = (grid[0] - 1) * (cfg.tokens_per_second * spg if kind == "video" else 1)
    if temporal_span < max(grid[1], grid[2]) // merge:
        np.testing.assert_array_equal(qwen, mine)
    else:
        vision = np.flatnonzero(ids == cfg.video_token_id)
        end = vision[-1] + 1
        np.testing.assert_array_equal(qwen[:, :end], mine[:, :end])
        assert qwen[0, end] == qwen[:, :end].max() + 1  # text resumes one past the block's largest position
        np.testing.assert_array_equal(np.diff(qwen[:, end:]), 1)


# ----------------------------------------------------------------------------------------------
# ONNX graphs against transformers


@pytest.mark.parametrize("kind,grid_source", [("video", 16), ("image", (100, 150))])
def test_vision_features_match_transformers(checkpoint, captioner, kind, grid_source):
    pre = captioner.config.preprocess
    if kind == "video":
        pixels, grid = rc.preprocess_video(_frames(grid_source), pre)
    else:
        pixels, grid = rc.preprocess_image(_frames(1, grid_source)[0], pre)
    feats = captioner.backend.vision(rc.vision_inputs(pixels, [grid], captioner.config))
    with torch.no_grad():
        expected = checkpoint.model.model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor([grid])).pooler_output
    assert feats.shape == tuple(expected.shape)
    assert np.abs(feats - expected.numpy()).max() < 1e-4


def _generate_reference(checkpoint, captioner, prep, item: rc.VisionItem, pixels, max_new_tokens: int):
    """transformers' greedy generate() on the same token ids and pixels."""
    cfg = captioner.config
    ids = torch.from_numpy(prep["input_ids"])[None]
    mm = torch.zeros_like(ids)
    kwargs = {}
    if item.kind == "video":
        mm[ids == cfg.video_token_id] = 2
        kwargs = {"pixel_values_videos": torch.from_numpy(pixels), "video_grid_thw": torch.tensor([item.grid]),
                  "second_per_grid_ts": torch.tensor([item.second_per_grid])}
    else:
        mm[ids == cfg.image_token_id] = 1
        kwargs = {"pixel_values": torch.from_numpy(pixels), "image_grid_thw": torch.tensor([item.grid])}
    with torch.no_grad():
        out = checkpoint.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                                        do_sample=False, max_new_tokens=max_new_tokens,
                                        eos_token_id=list(cfg.eos_token_ids), pad_token_id=cfg.eos_token_ids[0],
                                        **kwargs)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kind", ["video", "image"])
def test_greedy_tokens_equal_transformers_generate(checkpoint, onnx_dir, kind):
    # transformers 5 places text after a video by its spatial side (see mrope_positions); the oracle
    # comparison uses its convention, 16 frames make the two conventions differ.
    captioner = rc.Captioner(onnx_dir, threads=2, rope_text_offset="transformers5")
    pre = captioner.config.preprocess
    if kind == "video":
        pixels, grid = rc.preprocess_video(_frames(16, seed=3), pre)
        item = rc.VisionItem("video", grid, pre.temporal_patch_size / rc.OFFICIAL_FPS)
    else:
        pixels, grid = rc.preprocess_image(_frames(1, (100, 150), seed=4)[0], pre)
        item = rc.VisionItem("image", grid)
    text = "Describe the video in detail." if kind == "video" else None  # None: SkyCaptioner's instruction
    result = captioner.generate(pixels, item, text, max_new_tokens=NEW_TOKENS)
    prep = captioner.prepare(pixels, item, text if text is not None else rc.caption_instruction())
    expected = _generate_reference(checkpoint, captioner, prep, item, pixels, NEW_TOKENS)
    assert result.tokens == expected
    assert len(set(expected)) > 5  # a varied sequence, not one token repeated
    assert result.stop_reason == ("eos" if expected[-1] in captioner.config.eos_token_ids else "max_new_tokens")


def test_prompt_ids_equal_chat_template_and_processor_expansion(checkpoint, captioner):
    """The prompt the runtime builds = the checkpoint's chat template, each pad token repeated once per
    merged vision token (Qwen2_5_VLProcessor's replacement), tokenized by transformers."""
    grid = (1, 8, 10)
    item = rc.VisionItem("image", grid)
    mine = rc.expand_vision_tokens(captioner.prompt_ids("What is shown?", "image"), [item], captioner.config)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = checkpoint.tokenizer.apply_chat_template(conv, chat_template=checkpoint.folder.chat_template,
                                                    tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (grid[1] * grid[2] // 4))
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert mine.tolist() == checkpoint.tokenizer(text, add_special_tokens=False)["input_ids"]


class _ScriptedBackend:
    """A fake backend whose logits pick a scripted token each call (for the stop conditions)."""

    def __init__(self, script: list[int], vocab: int = 16):
        self.script, self.vocab, self.calls = list(script), vocab, []

    def vision(self, feeds):
        raise NotImplementedError

    def empty_cache(self):
        return 0

    def decoder(self, embeds, position_ids, cache):
        self.calls.append((embeds.shape[1], position_ids[:, 0].tolist(), cache))
        logits = np.zeros((1, self.vocab), dtype=np.float32)
        logits[0, self.script[len(self.calls) - 1]] = 1.0
        return logits, cache + embeds.shape[1]


def test_greedy_decode_stops_and_feeds_positions():
    table = np.eye(16, dtype=np.float32)
    embeds, positions = np.zeros((5, 16), np.float32), np.zeros((3, 5), np.int64)
    backend = _ScriptedBackend([3, 4, 9, 7, 7, 7])
    tokens, reason, _ = rc.greedy_decode(backend, embeds, positions, delta=-2, embed_table=table,
                                         eos_token_ids=[9, 11], max_new_tokens=10)
    assert (tokens, reason) == ([3, 4, 9], "eos")  # the stop token is returned, as generate() does
    assert [c[0] for c in backend.calls] == [5, 1, 1]
    assert [c[1] for c in backend.calls[1:]] == [[[3]] * 3, [[4]] * 3]  # cache index + delta
    assert [c[2] for c in backend.calls] == [0, 5, 6]
    tokens, reason, _ = rc.greedy_decode(_ScriptedBackend([1, 2, 3, 4]), embeds, positions, 0, table, [9], 3)
    assert (tokens, reason) == ([1, 2, 3], "max_new_tokens")


# ----------------------------------------------------------------------------------------------
# Export variants, engines, end to end


def test_fp16_export_with_external_data(checkpoint, captioner, tmp_path):
    out = tmp_path / "fp16"
    manifest = export_captioner_onnx(None, out, "fp16", progress=False, frame_size=FRAME_SIZE, checkpoint=checkpoint,
                                     external_data_threshold=1)  # force the >2 GB layout on a tiny graph
    for name in ("vision", "decoder_prefill"):
        entry = manifest["graphs"][name]
        assert entry["external_data"] and (out / entry["external_data"]).is_file()
    half = rc.Captioner(out, threads=2)
    assert half.embed_table.dtype == np.float16
    pixels, grid = rc.preprocess_video(_frames(16, seed=5), captioner.config.preprocess)
    full_feats = captioner.backend.vision(rc.vision_inputs(pixels, [grid], captioner.config))
    half_feats = half.backend.vision(rc.vision_inputs(pixels, [grid], half.config, np.float16))
    assert half_feats.dtype == np.float16
    scale = np.abs(full_feats).max()
    assert np.abs(half_feats.astype(np.float32) - full_feats).max() < 5e-3 * scale
    item = rc.VisionItem("video", grid, 1.0)
    first = half.generate(pixels, item, "Describe.", max_new_tokens=4).tokens
    assert first[0] == captioner.generate(pixels, item, "Describe.", max_new_tokens=1).tokens[0]


def test_manifest_profiles_and_tensorrt_rtx_builds(onnx_dir, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the test extra installs it)")
    from skyrt.export.engine import BuildOptions, build_engines, graphs_from_onnx_manifest

    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    prefill, decode = manifest["graphs"]["decoder_prefill"], manifest["graphs"]["decoder_decode"]
    assert prefill["file"] == decode["file"] == "decoder.onnx"
    assert prefill["profile"]["past_key_0"][2][2] == 0 and decode["profile"]["inputs_embeds"][2][1] == 1
    assert decode["profile"]["past_key_0"][2][2] == manifest["export_config"]["max_total_tokens"] - 1
    specs = graphs_from_onnx_manifest(onnx_dir)
    assert sorted(s.name for s in specs) == ["decoder_decode", "decoder_prefill", "vision"]
    paths = build_engines(specs, tmp_path / "engines", BuildOptions(compute_capabilities=["8.9"]), progress=False)
    assert sorted(p.name for p in paths) == ["decoder_decode.engine", "decoder_prefill.engine", "vision.engine"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_caption_video_end_to_end_keeps_raw_text(onnx_dir, tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for frame in _frames(20, (64, 96)):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    # A random model writes noise, not JSON: the error carries the generated text.
    with pytest.raises(CaptionParseError) as err:
        rc.caption_video(path, onnx_dir, max_new_tokens=12, threads=2)
    expected = rc.Captioner(onnx_dir, threads=2).generate_frames(rc.read_video_frames(path), max_new_tokens=12)
    assert err.value.raw == expected.text and len(expected.tokens) == 12


def test_runtime_path_imports_no_torch(onnx_dir):
    """The serving path (no torch: torch is for export and the reference backend) captions with numpy + onnxruntime + tokenizers only."""
    code = (
        "import sys, numpy as np\n"
        "from skyrt.runtime.captioner import Captioner\n"
        f"result = Captioner({str(onnx_dir)!r}, threads=1).generate_frames(np.zeros((4, 112, 140, 3), np.uint8),"
        " max_new_tokens=3)\n"
        "assert len(result.tokens) == 3\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
