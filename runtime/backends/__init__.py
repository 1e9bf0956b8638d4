"""Backends run the three networks (text encoder, DiT, VAE) for the numpy rollout driver.

`get_backend(name, model, device)` picks one; each backend module is imported only when chosen so
that serving with onnxruntime or TensorRT never imports torch.
"""
from __future__ import annotations

from .base import Backend, ModelSpec, StreamingDecoder, TextContext

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def get_backend(name: str, model: ModelSpec, device: str = "cpu", **options) -> Backend:
    """Build the backend `name` for the model folder described by `model`."""
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(model, device=device, **options)
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model, device=device, **options)
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(model, device=device, **options)
    raise ValueError(f"unknown backend {name!r}; available here: {', '.join(BACKENDS)}")


__all__ = ["Backend", "ModelSpec", "StreamingDecoder", "TextContext", "get_backend", "BACKENDS"]
