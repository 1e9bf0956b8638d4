"""skyrt — deployment runtime for SkyReels-V2 diffusion-forcing video models.

    import skyrt
    pipe = skyrt.load("path/to/model")          # official or diffusers layout
    frames = pipe.generate("a red fox running", num_frames=97)   # uint8 [T, H, W, 3]
"""
from __future__ import annotations

__version__ = "0.1.0"


def load(model_dir=None, backend: str = "torch", device: str = "cpu", **kwargs):
    """Load a model folder (official or diffusers layout; None = the built-in default) as a Pipeline."""
    from skyrt.runtime.api import load as _load

    return _load(model_dir, backend=backend, device=device, **kwargs)


__all__ = ["load", "__version__"]
