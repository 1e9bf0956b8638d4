"""SkyCaptioner-V1 captioning without torch: PyAV frames, numpy preprocessing, ONNX graphs, greedy decoding.

    from skyrt.runtime.captioner import caption_video, open_captioner
    caption = caption_video("clip.mp4", "captioner-onnx/")      # -> StructuredCaption
    print(caption.shot_type, to_t2v_prompt(caption))
    captioner = open_captioner("SkyCaptioner-V1/")               # a checkpoint: exported once into the cache

The folder is what `skyrt.export.captioner.export.export_captioner_onnx` (`skyrt export onnx
--captioner`) writes: manifest.json, vision.onnx, decoder.onnx, embed_tokens.npy, tokenizer.json.
`open_captioner` also takes the checkpoint folder itself and exports it into $SKYRT_CACHE on first
use, in a subprocess (torch stays out of this process). Steps, each a function of this package:

1. frames (video.py): 16 frames at uniform indices round(i * (n - 1) / 16) (`sample_frame_indices`, the official
   script's formula), decoded with PyAV and resized to 360x420 (width x height) as the official
   script's decord reader does, ignoring the aspect ratio (`read_video_frames`).
2. pixels (preprocess.py): Qwen2.5-VL's processor in numpy (`preprocess_video` / `preprocess_image`): smart resize
   to multiples of patch*merge (28) within [min_pixels, max_pixels] with PIL bicubic, rescale 1/255
   (float64, then float32), CLIP normalisation, temporal groups of 2 frames, patches flattened as
   [t, h/m, w/m, m, m] rows of (C, 2, 14, 14). Equal to transformers' PIL image processor exactly.
3. vision graph inputs (preprocess.py, `vision_inputs`): 2D rotary tables and the gather/scatter indices of the
   windowed and per-frame attention, so the graph has no data-dependent code.
4. prompt: the checkpoint's chat template (rendered at export), the video's pad token repeated once
   per merged vision token, and 3D mrope positions (`mrope_positions`, transformers' get_rope_index).
5. decoding (decoding.py, `greedy_decode`): prefill over the whole prompt, then one token at a time with the
   per-layer K/V cache; stop at <|im_end|> / <|endoftext|> or max_new_tokens. Greedy: the official
   script samples at temperature 0.05, which divides logits by 0.05 (x20) before softmax, so any
   token whose logit trails the best by more than ~0.5 has probability < e^-10 of being picked;
   greedy is the deterministic limit of that setting.
6. parsing (`skyrt.runtime.caption_schema.parse_caption`): typed caption or CaptionParseError with
   the raw text.

Backends implement `CaptionerBackend` (vision features, one decoder call, an empty cache).

Modules, one concern each (none imports the facade; the facade imports them):
    config.py            constants of the official pipeline, the manifest and its reader
    video.py             step 1: frames of a video file (PyAV)
    preprocess.py        steps 2-4: processor, vision graph inputs, vision tokens and mrope positions
    decoding.py          step 5: CaptionerBackend and greedy_decode
    ort_backend.py       the graphs under onnxruntime
    tensorrt_backend.py  the engines under TensorRT (built into the cache on first use)
    first_use_export.py  a checkpoint folder -> its ONNX export in the cache (the one place that exports)
    facade.py            Captioner, open_captioner, caption_video
"""
from __future__ import annotations

from ..caption_schema import caption_instruction
from .config import MANIFEST_FORMAT, NUM_FRAMES, OFFICIAL_FPS, OFFICIAL_FRAME_SIZE, CaptionerConfig, read_manifest
from .decoding import CaptionerBackend, GenerationResult, greedy_decode
from .facade import CAPTIONER_ENV, Captioner, caption_video, open_captioner
from .first_use_export import CaptionerSetupError
from .ort_backend import OrtCaptionerBackend
from .preprocess import (VisionItem, expand_vision_tokens, mrope_positions, preprocess_image, preprocess_video,
                         smart_resize, vision_inputs, vision_rotary, vision_segments)
from .video import read_video_frames, sample_frame_indices

# What tests, the CLI, the benchmarks and the captioner export use (and CaptionerBackend, the contract a
# custom backend passed to Captioner implements); everything else lives in its module.
__all__ = ["CAPTIONER_ENV", "MANIFEST_FORMAT", "NUM_FRAMES", "OFFICIAL_FPS", "OFFICIAL_FRAME_SIZE", "Captioner",
           "CaptionerBackend", "CaptionerConfig", "CaptionerSetupError", "GenerationResult", "OrtCaptionerBackend",
           "VisionItem", "caption_instruction", "caption_video", "expand_vision_tokens", "greedy_decode",
           "mrope_positions", "open_captioner", "preprocess_image", "preprocess_video", "read_manifest",
           "read_video_frames", "sample_frame_indices", "smart_resize", "vision_inputs", "vision_rotary",
           "vision_segments"]
