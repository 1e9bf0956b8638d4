"""SkyCaptioner-V1 captioning without torch: PyAV frames, numpy preprocessing, ONNX graphs, greedy decoding.

    from skyrt.runtime.captioner import caption_video, open_captioner
    caption = caption_video("clip.mp4", "captioner-onnx/")      # -> StructuredCaption
    print(caption.shot_type, to_t2v_prompt(caption))
    captioner = open_captioner("SkyCaptioner-V1/")               # a checkpoint: exported once into the cache

The folder is what `skyrt.export.captioner.export.export_captioner_onnx` (`skyrt export onnx
--captioner`) writes: manifest.json, vision.onnx, decoder.onnx, embed_tokens.npy, tokenizer.json.
`open_captioner` also takes the checkpoint folder itself and exports it into $SKYRT_CACHE on first
use, in a subprocess (torch stays out of this process). Steps, each a function here:

1. frames: 16 frames at uniform indices round(i * (n - 1) / 16) (`sample_frame_indices`, the official
   script's formula), decoded with PyAV and resized to 360x420 (width x height) as the official
   script's decord reader does, ignoring the aspect ratio (`read_video_frames`).
2. pixels: Qwen2.5-VL's processor in numpy (`preprocess_video` / `preprocess_image`): smart resize
   to multiples of patch*merge (28) within [min_pixels, max_pixels] with PIL bicubic, rescale 1/255
   (float64, then float32), CLIP normalisation, temporal groups of 2 frames, patches flattened as
   [t, h/m, w/m, m, m] rows of (C, 2, 14, 14). Equal to transformers' PIL image processor exactly.
3. vision graph inputs (`vision_inputs`): 2D rotary tables and the gather/scatter indices of the
   windowed and per-frame attention, so the graph has no data-dependent code.
4. prompt: the checkpoint's chat template (rendered at export), the video's pad token repeated once
   per merged vision token, and 3D mrope positions (`mrope_positions`, transformers' get_rope_index).
5. decoding (`greedy_decode`): prefill over the whole prompt, then one token at a time with the
   per-layer K/V cache; stop at <|im_end|> / <|endoftext|> or max_new_tokens. Greedy: the official
   script samples at temperature 0.05, which divides logits by 0.05 (x20) before softmax, so any
   token whose logit trails the best by more than ~0.5 has probability < e^-10 of being picked;
   greedy is the deterministic limit of that setting.
6. parsing (`skyrt.runtime.caption_schema.parse_caption`): typed caption or CaptionParseError with
   the raw text.

Backends implement `CaptionerBackend` (vision features, one decoder call, an empty cache); the
onnxruntime one is here, the TensorRT one in runtime/backends/tensorrt_captioner.py.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from .caption_schema import MAX_NEW_TOKENS, StructuredCaption, caption_instruction, parse_caption

NUM_FRAMES = 16
# The official script reads frames at width 360, height 420 (decord), whatever the video's aspect.
OFFICIAL_FRAME_SIZE = (420, 360)  # (height, width)
# The processor's default fps (transformers 4.49-4.51, which the official vLLM run used): the 16
# frames count as 2 frames/s, so a temporal patch of 2 frames spans 1 s whatever the clip length.
OFFICIAL_FPS = 2.0
MANIFEST_FORMAT = "skyrt-captioner-onnx"


# ----------------------------------------------------------------------------------------------
# Settings read from the export manifest


@dataclass(frozen=True)
class PreprocessConfig:
    """The image/video processor's settings (preprocessor_config.json)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class CaptionerConfig:
    """Everything the host side needs besides the graphs (written by the export into the manifest)."""

    preprocess: PreprocessConfig
    image_token_id: int
    video_token_id: int
    eos_token_ids: tuple[int, ...]
    vision_head_dim: int
    vision_inv_freq: tuple[float, ...]  # the vision rotary's inv_freq buffer, fp32 values
    window_size: int  # pixels
    tokens_per_second: float
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    prompt_templates: dict[str, tuple[str, str]]  # "video"/"image" -> (text before, text after) the user text
    rope_text_offset: str = "qwen"

    @classmethod
    def from_manifest(cls, manifest: dict) -> "CaptionerConfig":
        c = dict(manifest["captioner"])
        c["preprocess"] = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in c["preprocess"].items()})
        c["eos_token_ids"] = tuple(c["eos_token_ids"])
        c["vision_inv_freq"] = tuple(c["vision_inv_freq"])
        c["prompt_templates"] = {k: tuple(v) for k, v in c["prompt_templates"].items()}
        return cls(**c)


# ----------------------------------------------------------------------------------------------
# 1. Frames


def sample_frame_indices(total_frames: int, num_frames: int = NUM_FRAMES) -> list[int]:
    """Uniform indices as the official script picks them: round(i * (total - 1) / num_frames) for
    i < num_frames, clipped to the last frame (short clips repeat frames)."""
    if total_frames < 1:
        raise ValueError("the video has no frames")
    step = max(0.0, (total_frames - 1) / num_frames)
    return [min(int(np.round(step * i)), total_frames - 1) for i in range(num_frames)]


def _count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        # Demuxing counts packets without decoding; the header's frame count is often absent or wrong.
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def read_video_frames(path: str | Path, num_frames: int = NUM_FRAMES,
                      size: tuple[int, int] | None = OFFICIAL_FRAME_SIZE) -> np.ndarray:
    """`num_frames` frames of a video file as uint8 [T, H, W, 3] RGB (PyAV).

    size=(height, width) resizes every frame with FFmpeg's scaler (default: the official 420x360,
    aspect ignored, as decord does there); None keeps the video's size.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} not found")
    wanted = sample_frame_indices(_count_frames(path), num_frames)
    picked: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for index, frame in enumerate(container.decode(stream)):
            if index > wanted[-1]:
                break
            if index in wanted:
                if size is not None:
                    frame = frame.reformat(width=size[1], height=size[0], format="rgb24")
                picked[index] = frame.to_ndarray(format="rgb24")
    missing = [i for i in wanted if i not in picked]
    if missing:
        raise ValueError(f"{path}: could not decode frames {missing[:5]} (counted {wanted[-1] + 1}+ frames)")
    return np.stack([picked[i] for i in wanted])


# ----------------------------------------------------------------------------------------------
# 2. Pixels: Qwen2.5-VL's image/video processor in numpy


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, scaled into [min_pixels, max_pixels] at
    about the same aspect ratio (Qwen2-VL's rule: round, then floor when too big, ceil when too small)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _resize_normalize(frames: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, 3, h, w]: PIL bicubic to the smart size, x rescale (in float64,
    then float32, as transformers does), (x - mean) / std in float32."""
    from PIL import Image

    t, height, width, _ = frames.shape
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    out = np.empty((t, 3, h, w), dtype=np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    for i, frame in enumerate(frames):
        if (h, w) != (height, width):
            frame = np.asarray(Image.fromarray(frame).resize((w, h), resample=Image.Resampling.BICUBIC))
        scaled = (frame.astype(np.float64) * cfg.rescale_factor).astype(np.float32)  # [h, w, 3]
        out[i] = ((scaled - mean) / std).transpose(2, 0, 1)
    return out


def _patchify(video: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 [T, 3, h, w] (T a multiple of the temporal patch) -> rows [t*gh*gw, 3*tp*p*p].

    Row order: temporal group, merged row, merged column, then the m x m patches of the merge block
    (so every 4 consecutive rows form one merged token); within a row: channel, frame, y, x."""
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    t, c, h, w = video.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = video.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, c, tp, p, p]
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)


def preprocess_video(frames: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames [T, H, W, 3] -> (pixel_values float32 [N, 3*tp*p*p], grid (t, h, w) in patches).
    A frame count not divisible by the temporal patch repeats the last frame."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    pad = -len(frames) % cfg.temporal_patch_size
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    return _patchify(_resize_normalize(frames, cfg), cfg)


def preprocess_image(image: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 [H, W, 3] -> (pixel_values [N, 3*tp*p*p], grid (1, h, w)): the image fills every frame
    of its temporal patch, as the image processor does."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    normalized = _resize_normalize(image[None], cfg)
    return _patchify(np.repeat(normalized, cfg.temporal_patch_size, axis=0), cfg)


# ----------------------------------------------------------------------------------------------
# 3. Vision graph inputs


def vision_rotary(grids: Sequence[tuple[int, int, int]], merge: int,
                  inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [N, head_dim] of the vision tower's 2D rotary, rows in patch order.

    Each patch has a (row, column) in its frame, laid out merge-block-major like the pixel rows; the
    angles are row * inv_freq and column * inv_freq side by side, repeated twice (rotate-half)."""
    inv_freq = np.asarray(inv_freq, dtype=np.float32)
    rows = []
    for t, h, w in grids:
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        rows.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    pos = np.concatenate(rows).astype(np.float32)  # [N, 2]
    freqs = (pos[:, :, None] * inv_freq[None, None, :]).reshape(len(pos), -1)  # [N, head_dim / 2], fp32
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _segment_tables(segments: list[np.ndarray], total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token segments -> gather [S, L] int64 (padded with token 0), valid [S, L] bool, scatter [N] int64
    (where each token's output sits in the flattened [S * L] result)."""
    longest = max(len(s) for s in segments)
    gather = np.zeros((len(segments), longest), dtype=np.int64)
    valid = np.zeros((len(segments), longest), dtype=bool)
    scatter = np.full(total, -1, dtype=np.int64)
    for i, seg in enumerate(segments):
        gather[i, : len(seg)] = seg
        valid[i, : len(seg)] = True
        scatter[seg] = i * longest + np.arange(len(seg))
    if (scatter < 0).any():
        raise AssertionError("vision attention segments do not cover every token")
    return gather, valid, scatter


def vision_segments(grids: Sequence[tuple[int, int, int]], merge: int, window_size: int,
                    patch_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(window segments, frame segments) as arrays of token indices in patch order.

    Windowed layers attend within squares of window_size // patch // merge merged tokens of one
    frame (edge windows are smaller); full-attention layers attend within one temporal patch of
    one image or video (transformers' cu_seqlens). Segment and token order follow transformers'
    window index, so the softmax sums run in the same order."""
    ws = window_size // merge // patch_size
    unit = merge * merge
    windows, frames = [], []
    offset = 0
    for t, h, w in grids:
        lh, lw = h // merge, w // merge
        units = np.arange(t * lh * lw).reshape(t, lh, lw)
        for ti in range(t):
            frames.append(offset + np.arange(ti * h * w, (ti + 1) * h * w))
            for r in range(0, lh, ws):
                for c in range(0, lw, ws):
                    merged = units[ti, r:r + ws, c:c + ws].reshape(-1)
                    windows.append(offset + (merged[:, None] * unit + np.arange(unit)).reshape(-1))
        offset += t * h * w
    return windows, frames


def vision_inputs(pixel_values: np.ndarray, grids: Sequence[tuple[int, int, int]], cfg: CaptionerConfig,
                  dtype: np.dtype = np.float32) -> dict[str, np.ndarray]:
    """Feeds of the vision graph for `grids` (patch counts t, h, w per image/video):

    pixel_values [N, 3*tp*p*p] (in the graph's dtype), rope_cos/rope_sin float32 [N, head_dim],
    window_gather/window_valid [W, Lw] + window_scatter [N], frame_gather/frame_valid [F, Lf] +
    frame_scatter [N]."""
    pre = cfg.preprocess
    total = sum(t * h * w for t, h, w in grids)
    if pixel_values.shape[0] != total:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows, the grids {list(grids)} need {total}")
    cos, sin = vision_rotary(grids, pre.merge_size, np.asarray(cfg.vision_inv_freq, dtype=np.float32))
    windows, frames = vision_segments(grids, pre.merge_size, cfg.window_size, pre.patch_size)
    wg, wv, wsc = _segment_tables(windows, total)
    fg, fv, fsc = _segment_tables(frames, total)
    return {"pixel_values": pixel_values.astype(dtype, copy=False), "rope_cos": cos, "rope_sin": sin,
            "window_gather": wg, "window_valid": wv, "window_scatter": wsc,
            "frame_gather": fg, "frame_valid": fv, "frame_scatter": fsc}


# ----------------------------------------------------------------------------------------------
# 4. Prompt and 3D positions


@dataclass
class VisionItem:
    """One image or video of a prompt: kind, patch grid (t, h, w) and seconds per temporal patch."""

    kind: str  # "image" | "video"
    grid: tuple[int, int, int]
    second_per_grid: float = 1.0


def expand_vision_tokens(ids: Sequence[int], items: Sequence[VisionItem], cfg: CaptionerConfig) -> np.ndarray:
    """Replace each image/video pad token by one pad per merged vision token (t*h*w / merge^2)."""
    unit = cfg.preprocess.merge_size ** 2
    pads = {cfg.image_token_id: "image", cfg.video_token_id: "video"}
    out: list[int] = []
    queue = list(items)
    for token in ids:
        if token in pads:
            if not queue or queue[0].kind != pads[token]:
                raise ValueError(f"prompt has a {pads[token]} placeholder with no matching {pads[token]} input")
            item = queue.pop(0)
            out += [token] * (item.grid[0] * item.grid[1] * item.grid[2] // unit)
        else:
            out.append(token)
    if queue:
        raise ValueError(f"{len(queue)} vision input(s) have no placeholder in the prompt")
    return np.asarray(out, dtype=np.int64)


def mrope_positions(input_ids: np.ndarray, items: Sequence[VisionItem], cfg: CaptionerConfig,
                    text_offset: str | None = None) -> tuple[np.ndarray, int]:
    """3D rotary positions [3, L] int64 (temporal, height, width) and the decode offset `delta`
    (a token at cache index i >= L gets position i + delta on all three axes).

    Text tokens count up on all three axes. A vision block at start s gets t*interval + s,
    row + s, column + s in merged units, interval = tokens_per_second * seconds per temporal patch
    (1 for images), truncated to an integer. The text after a block starts at:
    - "qwen": one past the block's largest position (Qwen2.5-VL's original code, transformers < 5,
      and vLLM, under which SkyCaptioner-V1 was trained and released);
    - "transformers5": s + max(h, w) / merge (transformers 5.x get_rope_index).
    Both agree unless a video's temporal span outgrows its spatial side (the official 16-frame
    input: temporal 0..14, spatial 15 or more, so they agree there).
    """
    text_offset = text_offset or cfg.rope_text_offset
    if text_offset not in ("qwen", "transformers5"):
        raise ValueError(f"text_offset must be 'qwen' or 'transformers5', got {text_offset!r}")
    merge = cfg.preprocess.merge_size
    vision = {cfg.image_token_id, cfg.video_token_id}
    ids = np.asarray(input_ids).reshape(-1)
    parts = []
    pos = 0
    queue = list(items)
    i = 0
    while i < len(ids):
        j = i
        if ids[i] in vision:
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            item = queue.pop(0)
            t, h, w = item.grid[0], item.grid[1] // merge, item.grid[2] // merge
            if (j - i) != t * h * w:
                raise ValueError(f"{j - i} {item.kind} tokens but the grid {item.grid} has {t * h * w}")
            interval = cfg.tokens_per_second * item.second_per_grid if item.kind == "video" else 1
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            # float multiply then truncate, as torch's (arange * interval).long()
            block = np.stack([(tt * np.float64(interval)).astype(np.int64), hh, ww]).reshape(3, -1) + pos
            parts.append(block)
            pos = int(block.max()) + 1 if text_offset == "qwen" else pos + max(h, w)
        else:
            while j < len(ids) and ids[j] not in vision:
                j += 1
            parts.append(np.broadcast_to(np.arange(pos, pos + j - i), (3, j - i)))
            pos += j - i
        i = j
    positions = np.concatenate(parts, axis=1).astype(np.int64)
    return positions, int(positions.max()) + 1 - len(ids)


# ----------------------------------------------------------------------------------------------
# 5. Backends and greedy decoding


class CaptionerBackend(Protocol):
    """What the decoding loop needs from an inference backend (onnxruntime here; TensorRT in
    backends/tensorrt_captioner.py)."""

    def vision(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Vision graph feeds (see `vision_inputs`) -> merged features [N / merge^2, hidden]."""

    def empty_cache(self) -> Any:
        """A K/V cache holding nothing (whatever the backend keeps between decoder calls)."""

    def decoder(self, embeds: np.ndarray, position_ids: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        """embeds [1, S, hidden], position_ids int64 [3, 1, S], cache of P tokens ->
        (logits float32 [1, vocab] of the last token, cache of P + S tokens)."""


class OrtCaptionerBackend:
    """The exported graphs under onnxruntime; the K/V cache is the list of present tensors."""

    def __init__(self, onnx_dir: str | Path, manifest: dict, threads: int | None = None,
                 providers: Sequence[str] | None = None):
        import onnxruntime as ort

        self.dir = Path(onnx_dir)
        self.manifest = manifest
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = list(providers or ["CPUExecutionProvider"])
        graphs = manifest["graphs"]
        self.vision_session = ort.InferenceSession(str(self.dir / graphs["vision"]["file"]), options,
                                                   providers=providers)
        self.decoder_session = ort.InferenceSession(str(self.dir / graphs["decoder_prefill"]["file"]), options,
                                                    providers=providers)
        if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in self.decoder_session.get_providers():
            # onnxruntime-gpu quietly runs on the CPU when CUDA is missing: say so.
            raise RuntimeError("onnxruntime fell back to the CPU: CUDAExecutionProvider is not available here")
        self.vision_names = {i.name for i in self.vision_session.get_inputs()}
        cfg = manifest["captioner"]
        self.num_layers = cfg["num_layers"]
        self.kv_shape = (1, cfg["num_kv_heads"], 0, cfg["head_dim"])
        self.dtype = np.float16 if manifest["precision"] == "fp16" else np.float32
        self.present_names = [n for i in range(self.num_layers) for n in (f"present_key_{i}", f"present_value_{i}")]

    def vision(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {k: v for k, v in feeds.items() if k in self.vision_names}
        return self.vision_session.run(["features"], feeds)[0]

    def empty_cache(self) -> list[np.ndarray]:
        return [np.zeros(self.kv_shape, dtype=self.dtype) for _ in range(2 * self.num_layers)]

    def decoder(self, embeds: np.ndarray, position_ids: np.ndarray, cache: list[np.ndarray]):
        feeds = {"inputs_embeds": embeds.astype(self.dtype, copy=False), "position_ids": position_ids}
        for i in range(self.num_layers):
            feeds[f"past_key_{i}"] = cache[2 * i]
            feeds[f"past_value_{i}"] = cache[2 * i + 1]
        outputs = self.decoder_session.run(["logits", *self.present_names], feeds)
        return outputs[0], outputs[1:]


@dataclass
class GenerationResult:
    """Generated token ids (including the stop token, like transformers' generate), the decoded
    text (special tokens removed), why decoding stopped, and timings in seconds."""

    tokens: list[int]
    text: str
    stop_reason: str  # "eos" | "max_new_tokens"
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


def greedy_decode(backend: CaptionerBackend, embeds: np.ndarray, positions: np.ndarray, delta: int,
                  embed_table: np.ndarray, eos_token_ids: Sequence[int],
                  max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[list[int], str, dict[str, float]]:
    """Greedy decoding with the K/V cache: prefill the prompt (embeds [L, hidden], positions [3, L]),
    then feed back each argmax token at position (cache index + delta) on all three axes.

    Returns (tokens, stop reason, timings: prefill_s, decode_s, decode_tokens). Ties go to the
    lowest token id (numpy argmax), as in torch."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    eos = set(int(t) for t in eos_token_ids)
    start = time.perf_counter()
    logits, cache = backend.decoder(embeds[None], positions[:, None, :], backend.empty_cache())
    prefill_s = time.perf_counter() - start
    length = embeds.shape[0]
    tokens: list[int] = []
    reason = "max_new_tokens"
    start = time.perf_counter()
    steps = 0
    while True:
        token = int(np.argmax(logits[0]))
        tokens.append(token)
        if token in eos:
            reason = "eos"
            break
        if len(tokens) >= max_new_tokens:
            break
        position = np.full((3, 1, 1), length + delta, dtype=np.int64)
        logits, cache = backend.decoder(embed_table[token][None, None], position, cache)
        length += 1
        steps += 1
    decode_s = time.perf_counter() - start
    return tokens, reason, {"prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps}


# ----------------------------------------------------------------------------------------------
# The captioner


def read_manifest(onnx_dir: str | Path) -> dict:
    """The export's manifest.json, or in an engine folder the copy `skyrt export engine` puts there."""
    path = Path(onnx_dir) / "manifest.json"
    if not path.is_file() and (Path(onnx_dir) / "onnx_manifest.json").is_file():
        path = Path(onnx_dir) / "onnx_manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: export the captioner first "
                                "(skyrt.export.captioner.export.export_captioner_onnx)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a captioner export (format {manifest.get('format')!r}, "
                         f"expected {MANIFEST_FORMAT!r})")
    return manifest


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
            from .backends.onnxruntime_backend import default_cache_root
            from .backends.tensorrt_captioner import TrtCaptionerBackend, captioner_engine_folder

            root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
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


# ----------------------------------------------------------------------------------------------
# Opening a captioner from what users have: an export folder or the checkpoint itself

CAPTIONER_ENV = "SKYRT_CAPTIONER"
# What exporting a checkpoint imports (the `export` extra); the serving process never does.
EXPORT_MODULES = ("torch", "transformers", "onnx")
_NEEDS = ("a SkyCaptioner-V1 checkpoint folder (config.json with model_type qwen2_5_vl, *.safetensors, "
          "tokenizer.json, tokenizer_config.json, preprocessor_config.json, a chat template; "
          "https://huggingface.co/Skywork/SkyCaptioner-V1) or a folder written by "
          "'skyrt export onnx --captioner DIR --out OUT'")


class CaptionerSetupError(RuntimeError):
    """A captioner that cannot be opened as given (missing export dependencies); the message says the fix."""


def is_captioner_export(path: str | Path) -> bool:
    """True for a folder whose manifest.json is a captioner export's."""
    manifest = Path(path).expanduser() / "manifest.json"
    try:
        return manifest.is_file() and json.loads(manifest.read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError):
        return False


def _check_checkpoint_folder(path: Path) -> None:
    """Refuse a folder that is neither kind with what was expected; name missing files of a checkpoint."""
    from skyrt.export.captioner.loader import inspect_captioner_folder  # torch-free: only reads JSON

    if not path.is_dir():
        raise FileNotFoundError(f"captioner folder {path} does not exist; pass {_NEEDS}")
    manifest, config = path / "manifest.json", path / "config.json"
    if manifest.is_file():
        try:
            fmt = json.loads(manifest.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = "unreadable"
        raise ValueError(f"{manifest} is a {fmt!r} export, not a captioner export ({MANIFEST_FORMAT!r}); "
                         f"pass {_NEEDS}")
    if not config.is_file():
        raise ValueError(f"{path} is not a captioner: it has neither manifest.json nor config.json; pass {_NEEDS}")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "qwen2_5_vl":
        # A video model folder given by mistake is the likely case: say what it is.
        raise ValueError(f"{config} has model_type {model_type!r}, not 'qwen2_5_vl': this is not a captioner; "
                         f"pass {_NEEDS}")
    inspect_captioner_folder(path)  # names every missing file


def missing_export_modules() -> list[str]:
    """The modules of the `export` extra that are not installed here."""
    import importlib.util

    return [m for m in EXPORT_MODULES if importlib.util.find_spec(m) is None]


def _export_checkpoint(source: Path, out: Path, precision: str, progress: bool) -> None:
    """Export `source` into `out` in a subprocess, so the calling process (a server) never imports torch."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "skyrt.export.export_cli", "onnx", "--captioner", str(source), "--out", str(out),
           "--precision", precision]
    if not progress:
        cmd.append("--no-progress")
    result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress) goes to the user
    if result.returncode != 0:
        raise RuntimeError(f"exporting the captioner failed (exit {result.returncode}): {' '.join(cmd)}\n"
                           f"{result.stdout}")


def exported_captioner_dir(checkpoint_dir: str | Path, precision: str = "fp32", cache_dir: str | Path | None = None,
                           progress: bool = True) -> Path:
    """The ONNX export of a checkpoint folder in the cache, exported on first use.

    The cache entry ($SKYRT_CACHE or ~/.cache/skyrt, under captioner/) is keyed by a hash of the
    checkpoint's files and the export settings, like the DiT exports of the onnxruntime backend, so
    a changed checkpoint is exported again and an unchanged one never is."""
    import hashlib
    import os
    import shutil
    import sys

    from .backends.onnxruntime_backend import default_cache_root
    from .text_cache import tree_sha256

    source = Path(checkpoint_dir).expanduser()
    _check_checkpoint_folder(source)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    # The memo file makes later starts cheap: a 16 GB checkpoint is read once, then known by size and mtime.
    model_hash = tree_sha256([source], memo_file=root / "file-hashes.json")
    settings = {"format": MANIFEST_FORMAT, "precision": precision, "num_frames": NUM_FRAMES,
                "frame_size": list(OFFICIAL_FRAME_SIZE)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    target = root / "captioner" / model_hash[:16] / f"{precision}-{key}"
    if is_captioner_export(target):
        return target
    missing = missing_export_modules()
    if missing:
        raise CaptionerSetupError(
            f"{source} is a captioner checkpoint; its first use exports it to ONNX, which needs the 'export' extra "
            f"(missing here: {', '.join(missing)}). Install it with pip install 'skyrt[export]' (pin torch on "
            "CPU-only machines, e.g. torch==2.13.0), or export on a machine that has it with "
            f"'skyrt export onnx --captioner {source} --out OUT' and pass OUT instead")
    if progress:
        print(f"skyrt: exporting the captioner {source} to ONNX in {target} (first use only)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _export_checkpoint(source, staging, precision, progress)
        os.replace(staging, target)  # a cache entry is only ever complete
    except OSError:
        if not is_captioner_export(target):  # not merely another process finishing the same export first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
        from .backends.tensorrt_captioner import is_captioner_engine_folder

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


__all__ = ["Captioner", "CaptionerBackend", "CaptionerConfig", "CaptionerSetupError", "GenerationResult",
           "OrtCaptionerBackend", "PreprocessConfig", "VisionItem", "caption_video", "expand_vision_tokens",
           "exported_captioner_dir", "greedy_decode", "is_captioner_export", "mrope_positions", "open_captioner",
           "preprocess_image", "preprocess_video", "read_video_frames", "sample_frame_indices", "smart_resize",
           "vision_inputs", "vision_rotary", "vision_segments"]
