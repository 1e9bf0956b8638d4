"""Builders for captioner tests: a tiny random SkyCaptioner-layout checkpoint, small video clips, and
a hand-written valid SkyCaptioner-V1 answer (a random model only ever writes noise).

Imported by tests (conftest.py puts this folder on sys.path): from captioner_checkpoints import ...
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# A caption as SkyCaptioner-V1 writes it: every field of the schema, shot labels from the closed sets
# (runtime/caption_schema.py SHOT_TYPES / SHOT_ANGLES / SHOT_POSITIONS).
VALID_CAPTION = {
    "subjects": [
        {"appearance": "A brown dog with a red collar.", "action": "It runs across the lawn and jumps.",
         "expression": "excited", "position": "Center of the frame.",
         "TYPES": {"type": "Animal", "sub_type": "Dog"}, "is_main_subject": True},
        {"appearance": "A wooden bench.", "action": "", "expression": "", "position": "On the right.",
         "TYPES": {"type": "Object", "sub_type": "Furniture"}, "is_main_subject": False},
    ],
    "shot_type": "full_shot", "shot_angle": "high_angle", "shot_position": "side_view",
    "camera_motion": "the camera tracks the dog to the left", "environment": "A park in summer.",
    "lighting": "Bright afternoon sun",
}


def valid_caption_text() -> str:
    """VALID_CAPTION the way the model emits it: a JSON object in a ```json fence."""
    return "```json\n" + json.dumps(VALID_CAPTION, indent=2) + "\n```"


def smooth_frames(count: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """uint8 [count, H, W, 3] low-frequency noise (structure that survives H.264 and resizing)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, size[0] // 8 + 1, size[1] // 8 + 1, 3)).astype(np.float64)
    frames = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, : size[0], : size[1]]
    return (frames + rng.normal(0, 8, frames.shape)).clip(0, 255).astype(np.uint8)


def write_clip(path: Path, count: int = 9, size: tuple[int, int] = (32, 32), fps: int = 8) -> Path:
    """A small H.264 mp4 written by skyrt's own writer (what users would feed `skyrt caption`)."""
    from skyrt.runtime.video_io import write_mp4

    write_mp4(smooth_frames(count, size), path, fps=fps)
    return path


def write_tiny_checkpoint(root: Path) -> Path:
    """A tiny random Qwen2.5-VL in SkyCaptioner-V1's folder layout (export/captioner/tiny.py)."""
    from skyrt.export.captioner.tiny import write_tiny_captioner

    return write_tiny_captioner(Path(root) / "SkyCaptioner-tiny")
