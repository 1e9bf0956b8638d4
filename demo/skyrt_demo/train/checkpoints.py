"""Training checkpoints: read without running code, written atomically, and what a VAE checkpoint says
about the phases it finished. A resumed run continues from these (see vae_phases.py and dit_phase.py
for what each stage stores)."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint (ours, or a user's --dit-init) read without running code: tensors, numbers,
    strings and containers only (weights_only), so a crafted pickle cannot execute anything."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0]
        raise ValueError(f"{path} is not a skyrt training checkpoint (tensors and numbers only): {first_line}") from err


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind


def vae_progress(state: dict | None) -> tuple[int, list[dict]]:
    """(phases finished, their summaries) of a VAE checkpoint. Checkpoints from before the phases
    existed say done=True when the short phase finished."""
    if state is None:
        return 0, []
    if "phases_done" in state:
        return state["phases_done"], state.get("summaries", [])
    return (1, [state["summary"]]) if state.get("done") else (0, [])
