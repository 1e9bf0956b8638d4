"""Export on first use: a SkyCaptioner-V1 checkpoint folder -> its ONNX export in the cache.

The one place the captioner turns a checkpoint into graphs. The export itself runs in a subprocess
(`python -m skyrt.export.export_cli onnx --captioner ...`) so the calling process (a server) never
imports torch; the checkpoint check is export code too, resolved by name with importlib (the
torch-free runtime never imports skyrt.export with an import statement).
"""
from __future__ import annotations

import json
from pathlib import Path

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
    import importlib

    # Export code resolved by name (torch-free: it only reads JSON); by importlib until runtime/registry.py lands.
    inspect_captioner_folder = importlib.import_module("skyrt.export.captioner.loader").inspect_captioner_folder

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

    from ..backends.onnxruntime_backend import default_cache_root
    from ..text_cache import tree_sha256

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

