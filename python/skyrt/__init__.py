"""skyrt — deployment runtime for SkyReels-V2 diffusion-forcing video models.

    import skyrt
    pipe = skyrt.load("path/to/model")          # official or diffusers layout
    frames = pipe.generate("a red fox running", num_frames=97)   # uint8 [T, H, W, 3]
"""
from __future__ import annotations

__version__ = "0.1.0"


def load(model_dir=None, backend: str = "torch", device: str = "cpu", text_cache=None, **kwargs):
    """Load a model folder (official or diffusers layout; None = the built-in default) as a Pipeline.

    backend="onnxruntime" also takes an export folder (manifest.json from `skyrt export onnx`); given
    a model folder it exports the graphs it needs into $SKYRT_CACHE on first use. backend="tensorrt"
    takes an engine folder, an export folder or a model folder (engines are built into the cache on
    first use; see skyrt.runtime.api.load). text_cache: a
    folder where prompt embeddings are kept, so no prompt is ever encoded twice.
    """
    from skyrt.runtime.api import load as _load

    if backend == "onnxruntime" and model_dir is not None:
        from skyrt.runtime.backends.onnxruntime_backend import export_folder_spec, is_export_folder

        if is_export_folder(model_dir):
            from skyrt.runtime.backends import get_backend
            from skyrt.runtime.pipeline import Pipeline

            pipe = Pipeline(get_backend(backend, export_folder_spec(model_dir), device=device, **kwargs))
            return _with_text_cache(pipe, text_cache)
    return _with_text_cache(_load(model_dir, backend=backend, device=device, **kwargs), text_cache)


def _with_text_cache(pipe, folder):
    if folder is not None:
        from skyrt.runtime.text_cache import enable_text_cache

        enable_text_cache(pipe.backend, folder)
    return pipe


__all__ = ["load", "__version__"]
