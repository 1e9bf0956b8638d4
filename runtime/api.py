"""`skyrt.load`: a model, ONNX export or engine folder (or the built-in default) -> a ready Pipeline."""
from __future__ import annotations

from pathlib import Path

from .backends import get_backend
from .backends.base import ModelSpec
from .default_model import default_model_dir
from .model_folder import inspect_model_folder
from .pipeline import Pipeline


def source_spec(model_dir: str | Path | None, backend: str = "torch") -> ModelSpec:
    """What `backend` is given, without loading anything: a model folder (official or diffusers
    layout) for every backend, an ONNX export folder for onnxruntime and tensorrt, an engine folder
    for tensorrt. None is the built-in default model."""
    if backend == "tensorrt":
        from .backends.tensorrt_backend import engine_folder_spec

        return engine_folder_spec(model_dir)
    path = default_model_dir() if model_dir is None else Path(model_dir).expanduser()
    if backend == "onnxruntime":
        from .backends.onnxruntime_backend import export_folder_spec, is_export_folder

        if is_export_folder(path):
            return export_folder_spec(path)
    return inspect_model_folder(path)


def load(model_dir: str | Path | None = None, backend: str = "torch", device: str = "cpu", **options) -> Pipeline:
    """Load a model for `backend`.

    Args:
        model_dir: see `source_spec`; None uses skyrt's built-in default model.
        backend: "torch" (reference), "onnxruntime" (exports ONNX into the cache on first use from a
            model folder) or "tensorrt" (also builds engines into the cache on first use).
        device: torch device for the torch backend ("cpu", "cuda"); onnxruntime: "cpu", "cuda[:N]",
            "tensorrt"; TensorRT engines always run on the GPU.
        options: passed to the backend (e.g. precision, cache_dir, builder).
    """
    if backend == "tensorrt" and device == "cpu":
        device = "cuda"  # engines only run on the GPU; "cpu" is merely skyrt.load's default
    return Pipeline(get_backend(backend, source_spec(model_dir, backend), device=device, **options))
