"""skyrt's built-in default model: the trained demo model shipped inside the package (when one is).

`skyrt-demo-world-v6` is a small SkyReels-V2 / Wan2.1 model trained on skyrt's procedural world
(demo/skyrt_demo/, not shipped): an ordinary official-layout folder that every loader reads like a real
checkpoint. Its `demo_model.json` holds the sampling settings its training run measured best;
`recommended_sampling` gives them to the CLI, the server and the benchmarks as defaults.
"""
from __future__ import annotations

import json
from pathlib import Path

from .request import RECOMMENDED_KEYS

DEMO_MODEL_NAME = "skyrt-demo-world-v6"
DEMO_META = "demo_model.json"
SHIPPED_DEMO_MODEL = Path(__file__).parent / "models" / DEMO_MODEL_NAME

# Keys of a model's recommendation that are sampling arguments of Pipeline.generate / stream: the
# request type's fields marked `recommended` (runtime/request.py).
SAMPLING_KEYS = RECOMMENDED_KEYS


def default_model_dir() -> Path:
    """The shipped demo model's folder (read-only: nothing is ever written into it); in a package
    without it (a trimmed install), skyrt's tiny random-weight model (written into the cache on first use)."""
    if (SHIPPED_DEMO_MODEL / "config.json").is_file():
        return SHIPPED_DEMO_MODEL
    from .registry import resolve

    return resolve("default_model:write")()


def recommended_sampling(model_dir: str | Path) -> dict:
    """The sampling settings a model folder recommends in its demo_model.json ({} when it has none):
    a subset of SAMPLING_KEYS, plus height/width from its training size."""
    meta_path = Path(model_dir) / DEMO_META
    if not meta_path.is_file():
        return {}
    meta = json.loads(meta_path.read_text())
    size = meta.get("config", {}).get("size")
    rec = {"height": size, "width": size} if size else {}
    rec.update(meta.get("recommended", {}))
    return {k: v for k, v in rec.items() if k in SAMPLING_KEYS}
