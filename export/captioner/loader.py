"""Load a SkyCaptioner-V1 / Qwen2.5-VL checkpoint folder through transformers (the reference).

A folder as published (Skywork/SkyCaptioner-V1 follows Qwen2.5-VL-7B-Instruct's layout):
    config.json                       model_type qwen2_5_vl (flat text fields + vision_config, or
                                      transformers 5's text_config/vision_config)
    model.safetensors                 or model.safetensors.index.json + the shards it names
    tokenizer.json, tokenizer_config.json
    preprocessor_config.json          min_pixels / max_pixels (or size), patch, merge, mean, std
    chat_template.json | chat_template.jinja | "chat_template" in tokenizer_config.json
`inspect_captioner_folder` checks all of it without torch and names every missing file;
`load_captioner` then builds the transformers model (Qwen2_5_VLForConditionalGeneration).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")


class CaptionerFolderError(FileNotFoundError):
    """A captioner folder that lacks files; the message lists each one."""


@dataclass
class CaptionerFolder:
    """What a checkpoint folder holds (checked, not loaded)."""

    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    preprocessor: dict[str, Any]
    chat_template: str
    generation_config: dict[str, Any] = field(default_factory=dict)


def _chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        return json.loads(tok_cfg.read_text()).get("chat_template")
    return None


def inspect_captioner_folder(path: str | Path) -> CaptionerFolder:
    """Check a checkpoint folder; CaptionerFolderError lists every missing file, ValueError a wrong model."""
    folder = Path(path)
    if not folder.is_dir():
        raise CaptionerFolderError(f"captioner folder {folder} does not exist")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    weights: list[Path] = []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = [folder / s for s in shards]
        missing += [f"{s} (listed in model.safetensors.index.json)" for s in shards if not (folder / s).is_file()]
    elif (folder / "model.safetensors").is_file():
        weights = [folder / "model.safetensors"]
    else:
        missing.append("model.safetensors or model.safetensors.index.json (+ shards)")
    template = _chat_template(folder)
    if template is None:
        missing.append("a chat template (chat_template.json, chat_template.jinja or tokenizer_config.json's "
                       "'chat_template')")
    if missing:
        raise CaptionerFolderError(f"{folder} is not a complete SkyCaptioner-V1 / Qwen2.5-VL checkpoint; missing: "
                                   + "; ".join(missing))
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"{folder / 'config.json'}: model_type {config.get('model_type')!r}, expected 'qwen2_5_vl' "
                         "(SkyCaptioner-V1 is a Qwen2.5-VL-7B-Instruct finetune)")
    gen_path = folder / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return CaptionerFolder(path=folder, config=config, weight_files=weights,
                           preprocessor=json.loads((folder / "preprocessor_config.json").read_text()),
                           chat_template=template, generation_config=generation)


@dataclass
class CaptionerCheckpoint:
    """A loaded checkpoint: the folder's facts, the transformers model (eval) and its tokenizer."""

    folder: CaptionerFolder
    model: Any  # transformers Qwen2_5_VLForConditionalGeneration
    tokenizer: Any  # transformers fast tokenizer


def load_captioner(path: str | Path, dtype: "Any" = None) -> CaptionerCheckpoint:
    """Load the model (dtype: torch dtype, default fp32) and tokenizer of a checked folder.

    Attention runs transformers' eager implementation: the reference numbers must not depend on
    which fused kernel a machine has."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    folder = inspect_captioner_folder(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(folder.path), dtype=dtype or torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder.path))
    return CaptionerCheckpoint(folder=folder, model=model, tokenizer=tokenizer)


def preprocess_settings(preprocessor: dict[str, Any]) -> dict[str, Any]:
    """The runtime's PreprocessConfig fields from preprocessor_config.json (old min/max_pixels keys or
    transformers 5's size {shortest_edge, longest_edge})."""
    size = preprocessor.get("size") or {}
    return {
        "min_pixels": int(preprocessor.get("min_pixels", size.get("shortest_edge", 56 * 56))),
        "max_pixels": int(preprocessor.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))),
        "patch_size": int(preprocessor.get("patch_size", 14)),
        "temporal_patch_size": int(preprocessor.get("temporal_patch_size", 2)),
        "merge_size": int(preprocessor.get("merge_size", 2)),
        "image_mean": [float(v) for v in preprocessor.get("image_mean", (0.48145466, 0.4578275, 0.40821073))],
        "image_std": [float(v) for v in preprocessor.get("image_std", (0.26862954, 0.26130258, 0.27577711))],
        "rescale_factor": float(preprocessor.get("rescale_factor", 1 / 255)),
    }
