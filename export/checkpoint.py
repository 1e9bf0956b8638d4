"""Strict, safe checkpoint reading shared by every loader.

- safetensors files (single or sharded with an index json) and `.pth` files, the latter always with
  `torch.load(weights_only=True)`: a checkpoint must never be able to run code;
- bf16/fp16 weights become fp32 on the CPU unless a dtype is asked for;
- `load_strict` refuses missing or unexpected keys (listing them) and shape mismatches (naming the
  key and both shapes) instead of silently leaving random weights in a model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint folder or file does not match what the model expects."""


def require_file(path: Path, layout: str) -> Path:
    """Return `path` if it exists, else raise naming the file and the layout that needs it."""
    if not path.is_file():
        raise CheckpointError(f"missing file {path} (expected by the {layout} layout)")
    return path


def read_pth(path: Path | str) -> StateDict:
    """Read a `.pth` state dict with weights_only=True (no pickled code can run)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError and friends for unsafe content
        raise CheckpointError(
            f"{path} could not be read as a weights-only checkpoint ({type(err).__name__}: {err}). "
            "skyrt only reads tensors from .pth files; re-save the state dict with torch.save(model.state_dict())."
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def read_safetensors(paths: list[Path]) -> StateDict:
    """Read and merge safetensors files; a key present in two shards is an error."""
    from safetensors.torch import load_file

    merged: StateDict = {}
    for path in paths:
        for key, tensor in load_file(str(path)).items():
            if key in merged:
                raise CheckpointError(f"key {key!r} appears in more than one shard (second: {path})")
            merged[key] = tensor
    return merged


def safetensors_in(folder: Path, layout: str) -> list[Path]:
    """The safetensors files of a model folder: the index json's shards if there is one, else all."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        shards = sorted({folder / name for name in weight_map.values()})
        for shard in shards:
            require_file(shard, layout)
        return shards
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no *.safetensors weights in {folder} (expected by the {layout} layout)")
    return shards


def cast_floats(state: StateDict, dtype: torch.dtype) -> StateDict:
    """Cast floating-point tensors to `dtype`; integer buffers stay as they are."""
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def rename_keys(state: StateDict, rename: Callable[[str], str]) -> StateDict:
    """Apply a key map; two source keys landing on one name is an error, not a silent overwrite."""
    out: StateDict = {}
    for key, value in state.items():
        new_key = rename(key)
        if new_key in out:
            raise CheckpointError(f"key map sends two keys to {new_key!r} (second source: {key!r})")
        out[new_key] = value
    return out


def check_keys_and_shapes(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError listing missing/unexpected keys and every shape mismatch."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
    for key in sorted(set(expected) & set(given)):
        want, got = tuple(expected[key].shape), tuple(given[key].shape)
        if want != got:
            problems.append(f"shape mismatch for {key!r}: checkpoint has {got}, model expects {want}")
    if problems:
        raise CheckpointError(f"{source} does not match the model config:\n  " + "\n  ".join(problems))


def load_strict(module: nn.Module, state: StateDict, source: str) -> nn.Module:
    """Load `state` into `module` after the strict checks; dtype follows the module's tensors."""
    check_keys_and_shapes(module.state_dict(), state, source)
    module.load_state_dict(state, strict=True)
    return module


def _short_list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
