"""Export on first use: a SkyCaptioner-V1 checkpoint folder -> its ONNX export in the cache.

What decides the graphs (format, precision, frame count and size) and the checks that name what is
wrong with a folder live here; the cache itself (key, atomic publish, the exporter subprocess that
imports torch so this process never does) is runtime/artifact_cache.py, shared with the DiT backends.
The checkpoint check is export code, reached by name through runtime/registry.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..artifact_cache import cache_root, exported_captioner
from ..registry import resolve
from .config import MANIFEST_FORMAT, NUM_FRAMES, OFFICIAL_FRAME_SIZE, is_captioner_export

# What exporting a checkpoint imports (the `export` extra); the serving process never does.
EXPORT_MODULES = ("torch", "transformers", "onnx")
_NEEDS = ("a SkyCaptioner-V1 checkpoint folder (config.json with model_type qwen2_5_vl, *.safetensors, "
          "tokenizer.json, tokenizer_config.json, preprocessor_config.json, a chat template; "
          "https://huggingface.co/Skywork/SkyCaptioner-V1) or a folder written by "
          "'skyrt export onnx --captioner DIR --out OUT'")


class CaptionerSetupError(RuntimeError):
    """A captioner that cannot be opened as given (missing export dependencies); the message says the fix."""


def _check_checkpoint_folder(path: Path) -> None:
    """Refuse a folder that is neither kind with what was expected; name missing files of a checkpoint."""
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
    resolve("captioner:inspect_checkpoint")(path)  # names every missing file (reads JSON only)


def missing_export_modules() -> list[str]:
    """The modules of the `export` extra that are not installed here."""
    import importlib.util

    return [m for m in EXPORT_MODULES if importlib.util.find_spec(m) is None]


def exported_captioner_dir(checkpoint_dir: str | Path, precision: str = "fp32", cache_dir: str | Path | None = None,
                           progress: bool = True) -> Path:
    """The ONNX export of a checkpoint folder in the cache, exported on first use.

    The cache entry ($SKYRT_CACHE or ~/.cache/skyrt, under captioner/) is keyed by a hash of the
    checkpoint's files and the export settings, like the DiT exports of the onnxruntime backend, so
    a changed checkpoint is exported again and an unchanged one never is."""
    source = Path(checkpoint_dir).expanduser()
    _check_checkpoint_folder(source)
    settings = {"format": MANIFEST_FORMAT, "precision": precision, "num_frames": NUM_FRAMES,
                "frame_size": list(OFFICIAL_FRAME_SIZE)}

    def refuse_without_export_extra(_target: Path) -> None:
        missing = missing_export_modules()
        if missing:
            raise CaptionerSetupError(
                f"{source} is a captioner checkpoint; its first use exports it to ONNX, which needs the 'export' "
                f"extra (missing here: {', '.join(missing)}). Install it with pip install 'skyrt[export]' (pin torch "
                "on CPU-only machines, e.g. torch==2.13.0), or export on a machine that has it with "
                f"'skyrt export onnx --captioner {source} --out OUT' and pass OUT instead")

    return exported_captioner(source, cache_root(cache_dir), settings, precision, progress, is_captioner_export,
                              before_export=refuse_without_export_extra)
