"""skyrt — deployment runtime for SkyReels-V2 diffusion-forcing video models.

    import skyrt
    pipe = skyrt.load("path/to/model")          # official or diffusers layout
    frames = pipe.generate("a red fox running", num_frames=97)   # uint8 [T, H, W, 3]
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    """`skyrt.load` is skyrt.runtime.api.load, imported on first use (so `import skyrt` stays cheap)."""
    if name == "load":
        from skyrt.runtime.api import load

        return load
    raise AttributeError(f"module 'skyrt' has no attribute {name!r}")


__all__ = ["load", "__version__"]
