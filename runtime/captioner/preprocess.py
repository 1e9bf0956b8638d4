"""Steps 2-4 of captioning, in numpy: Qwen2.5-VL's image/video processor, the vision graph's
inputs (2D rotary, window tables) and the prompt's vision tokens with their 3D mrope positions."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .config import CaptionerConfig, PreprocessConfig

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

