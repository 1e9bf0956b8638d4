"""The captioner export's settings: constants of the official pipeline and what the manifest says.

Everything the host side needs besides the graphs is written by the export into manifest.json
(`CaptionerConfig.from_manifest`); `read_manifest` / `is_captioner_export` are the one reader of it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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



def is_captioner_export(path: str | Path) -> bool:
    """True for a folder whose manifest.json is a captioner export's."""
    manifest = Path(path).expanduser() / "manifest.json"
    try:
        return manifest.is_file() and json.loads(manifest.read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError):
        return False
