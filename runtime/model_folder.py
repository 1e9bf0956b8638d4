"""Recognise a model folder's layout and read its configs (json only: no torch, no weights).

Official layout (SkyReels-V2 / Wan2.1 releases):
    config.json, *.safetensors (+ index json when sharded), Wan2.1_VAE.pth,
    models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (tokenizer)
Diffusers layout:
    model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/
"""
from __future__ import annotations

import json
from pathlib import Path

from .backends.base import ModelSpec
from .model_config import DiTConfig

OFFICIAL_VAE = "Wan2.1_VAE.pth"
OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_TOKENIZER = "google/umt5-xxl"
DIFFUSERS_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")

class ModelFolderError(ValueError):
    """The folder is not a model folder skyrt understands."""


def detect_layout(path: Path) -> str:
    """'official' or 'diffusers'; raises naming what each layout needs when neither matches."""
    if not path.is_dir():
        raise ModelFolderError(f"model folder not found: {path}")
    if (path / "model_index.json").is_file():
        return "diffusers"
    if (path / "config.json").is_file():
        return "official"
    raise ModelFolderError(
        f"{path} is not a model folder: expected model_index.json (diffusers layout: "
        f"{', '.join(p + '/' for p in DIFFUSERS_PARTS)}) or config.json (official layout: config.json, "
        f"*.safetensors, {OFFICIAL_VAE}, {OFFICIAL_T5}, {OFFICIAL_TOKENIZER}/)"
    )


def inspect_model_folder(path: str | Path) -> ModelSpec:
    """Layout and DiT config (official field names) of a model folder."""
    path = Path(path).expanduser()
    layout = detect_layout(path)
    if layout == "official":
        config = _read_json(path / "config.json")
    else:
        for part in DIFFUSERS_PARTS:
            if not (path / part).is_dir():
                raise ModelFolderError(f"missing folder {path / part} (expected by the diffusers layout)")
        raw = _read_json(path / "transformer" / "config.json")
        config = DiTConfig.from_diffusers(raw).to_official()
    return ModelSpec(path=path, layout=layout, dit_config=config)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFolderError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path} is not valid JSON: {err}") from err


def text_encoder_files(spec: ModelSpec) -> list[Path]:
    """The files that decide a model folder's text contexts: umT5 weights and tokenizer (those present)."""
    if spec.layout == "official":
        parts = [spec.path / OFFICIAL_T5, spec.path / OFFICIAL_TOKENIZER]
    else:
        parts = [spec.path / "text_encoder", spec.path / "tokenizer"]
    return [p for p in parts if p.exists()]
