"""The captioner as users hold it: `Captioner` over an export folder, `open_captioner` for whatever
folder a user has (export, engine folder, or checkpoint: exported on first use), `caption_video`."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..caption_schema import MAX_NEW_TOKENS, StructuredCaption, caption_instruction, parse_caption
from .config import NUM_FRAMES, OFFICIAL_FPS, CaptionerConfig, is_captioner_export, read_manifest
from .decoding import CaptionerBackend, GenerationResult, greedy_decode
from .first_use_export import exported_captioner_dir
from .ort_backend import OrtCaptionerBackend
from .preprocess import (VisionItem, expand_vision_tokens, mrope_positions, preprocess_image, preprocess_video,
                         vision_inputs)
from .video import read_video_frames

CAPTIONER_ENV = "SKYRT_CAPTIONER"


class Captioner:
    """An exported SkyCaptioner-V1 (or any Qwen2.5-VL) ready to caption videos and images.

    backend: "onnxruntime" (CPU by default; pass providers for a GPU build), "tensorrt" (onnx_dir is
    an engine folder, or an export whose engines are built into the cache on first use) or a
    CaptionerBackend.
    rope_text_offset: override the export's mrope convention ("qwen" or "transformers5", see
    `mrope_positions`).
    builder, cache_dir, progress: TensorRT only: 'auto', 'tensorrt' or 'tensorrt-rtx'; the cache root
    ($SKYRT_CACHE or ~/.cache/skyrt); a progress bar while engines build.
    """

    def __init__(self, onnx_dir: str | Path, backend: str | CaptionerBackend = "onnxruntime",
                 threads: int | None = None, providers: Sequence[str] | None = None,
                 rope_text_offset: str | None = None, builder: str = "auto", cache_dir: str | Path | None = None,
                 progress: bool = True):
        from tokenizers import Tokenizer

        self.dir = Path(onnx_dir)
        self.manifest = read_manifest(self.dir)
        self.config = CaptionerConfig.from_manifest(self.manifest)
        if rope_text_offset is not None:
            self.config = replace(self.config, rope_text_offset=rope_text_offset)
        if backend == "onnxruntime":
            self.backend: CaptionerBackend = OrtCaptionerBackend(self.dir, self.manifest, threads, providers)
        elif backend == "tensorrt":
            from ..artifact_cache import cache_root
            from .tensorrt_backend import TrtCaptionerBackend, captioner_engine_folder

            root = cache_root(cache_dir)
            engines = captioner_engine_folder(self.dir, root, builder, progress)
            self.backend = TrtCaptionerBackend(engines, builder)
        elif isinstance(backend, str):
            raise ValueError(f"unknown captioner backend {backend!r}; available: onnxruntime, tensorrt")
        else:
            self.backend = backend
        self.tokenizer = Tokenizer.from_file(str(self.dir / self.manifest["tokenizer"]["file"]))
        emb = self.manifest["embeddings"]
        # Memory-mapped: the real table is 152064 x 3584 (1.1 GB in fp16); decoding reads one row a token.
        self.embed_table = np.load(self.dir / emb["file"], mmap_mode="r")
        self.vision_dtype = np.float16 if self.manifest["precision"] == "fp16" else np.float32

    # -- prompt --------------------------------------------------------------------------------

    def prompt_ids(self, text: str, kind: str) -> list[int]:
        """Token ids of the chat prompt with one placeholder pad for the image or video."""
        before, after = self.config.prompt_templates[kind]
        return self.tokenizer.encode(before + text + after, add_special_tokens=False).ids

    def prepare(self, pixel_values: np.ndarray, item: VisionItem, text: str) -> dict[str, Any]:
        """Vision features spliced into the prompt's embeddings: returns embeds [L, hidden], positions
        [3, L], delta, input_ids [L] and the vision time in seconds."""
        start = time.perf_counter()
        feats = self.backend.vision(vision_inputs(pixel_values, [item.grid], self.config, self.vision_dtype))
        vision_s = time.perf_counter() - start
        ids = expand_vision_tokens(self.prompt_ids(text, item.kind), [item], self.config)
        pad = self.config.video_token_id if item.kind == "video" else self.config.image_token_id
        embeds = np.asarray(self.embed_table[ids])  # [L, hidden] (a copy: the table is read-only)
        mask = ids == pad
        if int(mask.sum()) != feats.shape[0]:
            raise AssertionError(f"{int(mask.sum())} pad tokens for {feats.shape[0]} vision features")
        embeds[mask] = feats.astype(embeds.dtype, copy=False)
        positions, delta = mrope_positions(ids, [item], self.config)
        return {"embeds": embeds, "positions": positions, "delta": delta, "input_ids": ids, "vision_s": vision_s}

    # -- generation ----------------------------------------------------------------------------

    def generate(self, pixel_values: np.ndarray, item: VisionItem, text: str | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> GenerationResult:
        """Greedy caption tokens for one preprocessed image/video (text: the instruction; default
        SkyCaptioner's)."""
        prep = self.prepare(pixel_values, item, caption_instruction() if text is None else text)
        tokens, reason, timings = greedy_decode(self.backend, prep["embeds"], prep["positions"], prep["delta"],
                                                self.embed_table, self.config.eos_token_ids, max_new_tokens)
        timings["vision_s"] = prep["vision_s"]
        text_out = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return GenerationResult(tokens=tokens, text=text_out, stop_reason=reason,
                                prompt_tokens=len(prep["input_ids"]), timings=timings)

    def generate_frames(self, frames: np.ndarray, text: str | None = None, fps: float = OFFICIAL_FPS,
                        max_new_tokens: int = MAX_NEW_TOKENS) -> GenerationResult:
        """Caption text for uint8 frames [T, H, W, 3] sampled at `fps` frames/s."""
        pixels, grid = preprocess_video(frames, self.config.preprocess)
        item = VisionItem("video", grid, self.config.preprocess.temporal_patch_size / fps)
        return self.generate(pixels, item, text, max_new_tokens)

    def generate_image(self, image: np.ndarray, text: str | None = None,
                       max_new_tokens: int = MAX_NEW_TOKENS) -> GenerationResult:
        pixels, grid = preprocess_image(image, self.config.preprocess)
        return self.generate(pixels, VisionItem("image", grid), text, max_new_tokens)

    def caption_frames(self, frames: np.ndarray, fps: float = OFFICIAL_FPS, strict: bool = False,
                       max_new_tokens: int = MAX_NEW_TOKENS) -> StructuredCaption:
        """A structured caption of uint8 frames [T, H, W, 3]; CaptionParseError keeps the raw text."""
        result = self.generate_frames(frames, fps=fps, max_new_tokens=max_new_tokens)
        return parse_caption(result.text, strict=strict)

    def caption_video(self, path: str | Path, num_frames: int = NUM_FRAMES, strict: bool = False,
                      max_new_tokens: int = MAX_NEW_TOKENS) -> StructuredCaption:
        """A structured caption of a video file (official frame sampling and sizing)."""
        return self.caption_frames(read_video_frames(path, num_frames), strict=strict, max_new_tokens=max_new_tokens)



def open_captioner(path: str | Path, backend: str | CaptionerBackend = "onnxruntime", threads: int | None = None,
                   cache_dir: str | Path | None = None, progress: bool = True, precision: str = "fp32",
                   builder: str = "auto") -> Captioner:
    """A ready Captioner from an export folder, or from a SkyCaptioner-V1 / Qwen2.5-VL checkpoint
    folder (exported into the cache on first use, see `exported_captioner_dir`; needs the `export`
    extra once); backend="tensorrt" also takes an engine folder and builds an export's engines into
    the cache on first use (`builder`: 'auto', 'tensorrt' or 'tensorrt-rtx'). Anything else is
    refused with what was expected."""
    folder = Path(path).expanduser()
    if backend == "tensorrt":
        from .tensorrt_backend import is_captioner_engine_folder

        if not (is_captioner_engine_folder(folder) or is_captioner_export(folder)):
            folder = exported_captioner_dir(folder, precision=precision, cache_dir=cache_dir, progress=progress)
        return Captioner(folder, backend="tensorrt", builder=builder, cache_dir=cache_dir, progress=progress)
    if not is_captioner_export(folder):
        folder = exported_captioner_dir(folder, precision=precision, cache_dir=cache_dir, progress=progress)
    return Captioner(folder, backend=backend, threads=threads)


def caption_video(path: str | Path, model_dir: str | Path, backend: str = "onnxruntime", strict: bool = False,
                  max_new_tokens: int = MAX_NEW_TOKENS, threads: int | None = None) -> StructuredCaption:
    """Caption one video file with a captioner export or checkpoint folder (see `open_captioner`)."""
    return open_captioner(model_dir, backend=backend, threads=threads).caption_video(
        path, strict=strict, max_new_tokens=max_new_tokens)
