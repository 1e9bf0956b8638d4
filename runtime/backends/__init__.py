"""Backends run the three networks (text encoder, DiT, VAE) for the numpy rollout driver.

`get_backend(name, model, device)` picks one by name through runtime/registry.py: each backend
module is imported only when chosen, so serving with onnxruntime or TensorRT never imports torch
(the torch backend lives in skyrt.export, export/torch_backend.py).
"""
from __future__ import annotations

from ..registry import BACKENDS, backend_class
from .base import Backend, ModelSpec, StreamingDecoder, TextContext


def get_backend(name: str, model: ModelSpec, device: str = "cpu", **options) -> Backend:
    """Build the backend `name` ("torch", "onnxruntime", "tensorrt") for the model folder `model`."""
    return backend_class(name)(model, device=device, **options)


__all__ = ["Backend", "ModelSpec", "StreamingDecoder", "TextContext", "get_backend", "BACKENDS"]
