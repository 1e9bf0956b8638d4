"""`skyrt.load`: a model folder (or the built-in default) -> a ready Pipeline."""
from __future__ import annotations

from pathlib import Path

from .backends import get_backend
from .model_folder import inspect_model_folder
from .pipeline import Pipeline


def default_model_dir() -> Path:
    """The built-in default model, created on first use (a tiny random-weight model for now)."""
    from skyrt.export.tiny import ensure_default_model

    return ensure_default_model()


def load(model_dir: str | Path | None = None, backend: str = "torch", device: str = "cpu", **options) -> Pipeline:
    """Load a model folder in the official or diffusers layout.

    Args:
        model_dir: the folder; None uses skyrt's built-in default model.
        backend: "torch" (reference).
        device: torch device for the torch backend ("cpu", "cuda").
    """
    spec = inspect_model_folder(default_model_dir() if model_dir is None else model_dir)
    return Pipeline(get_backend(backend, spec, device=device, **options))
