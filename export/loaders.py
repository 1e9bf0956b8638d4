"""Load the three networks of a model folder, official or diffusers layout, strictly.

Every weight goes through export/checkpoint.py: weights-only `.pth`, missing/unexpected keys and
shape mismatches are errors that name the key, and bf16 weights become fp32 unless told otherwise.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from skyrt.runtime.backends.base import ModelSpec
from skyrt.runtime.model_folder import OFFICIAL_T5, OFFICIAL_TOKENIZER, OFFICIAL_VAE

from .checkpoint import (
    cast_floats,
    load_strict,
    read_pth,
    read_safetensors,
    rename_keys,
    require_file,
    safetensors_in,
)
from .dit import DiTConfig, WanDiT, diffusers_to_official_key
from .text_encoder import TextEncoder, load_text_encoder_diffusers, load_text_encoder_official
from .vae import VAEConfig, WanVAE, convert_diffusers_vae_state_dict, infer_vae_config


def load_components(
    spec: ModelSpec, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    export_precision: Optional[str] = None,
) -> tuple[WanDiT, WanVAE, TextEncoder]:
    """(DiT, VAE, text encoder) of a model folder, in eval mode on `device`.

    The DiT takes `dtype`; the VAE and the text encoder stay fp32 (the official pipeline keeps the
    VAE in fp32; fp32 umT5 is the reference — the official code runs it in bf16).
    export_precision ("fp16"/"bf16", causal layout): the DiT loaded straight into the dtypes an
    export of that precision traces, tensor by tensor (export/causal_checkpoint.py load_cast_assign;
    the real 1.3B then never exists in fp32); other layouts load `dtype` as before.
    """
    if spec.layout == "causal":
        dit, vae, text_encoder = _load_causal(spec, dtype, export_precision)
    else:
        loader = _load_official if spec.layout == "official" else _load_diffusers
        dit, vae, text_encoder = loader(spec.path, dtype)
    for module in (dit, vae, text_encoder.model):
        module.to(device).eval()
    return dit, vae, text_encoder


def load_dit(path: Path, layout: str, dtype: torch.dtype = torch.float32) -> WanDiT:
    """The DiT alone; `path` is the model folder (official) or its transformer/ folder (diffusers)."""
    if layout == "official":
        config = DiTConfig.from_official(_read_json(require_file(path / "config.json", layout)))
        state = read_safetensors(safetensors_in(path, layout))
    else:
        config = DiTConfig.from_diffusers(_read_json(require_file(path / "config.json", layout)))
        state = rename_keys(read_safetensors(safetensors_in(path, layout)), diffusers_to_official_key)
    with torch.device("meta"):
        model = WanDiT(config)
    model = model.to_empty(device="cpu").to(dtype)
    return load_strict(model, cast_floats(state, dtype), f"DiT weights in {path}")


def load_vae(path: Path, layout: str) -> WanVAE:
    """The Wan2.1 VAE in fp32: `Wan2.1_VAE.pth` (official) or the vae/ folder (diffusers)."""
    if layout == "official":
        state = read_pth(require_file(path, layout))
        config = infer_vae_config(state)
    else:
        config = VAEConfig.from_diffusers(_read_json(require_file(path / "config.json", layout)))
        state = convert_diffusers_vae_state_dict(read_safetensors(safetensors_in(path, layout)))
    model = WanVAE(config)
    return load_strict(model, cast_floats(state, torch.float32), f"VAE weights in {path}")


def _load_official(path: Path, dtype: torch.dtype):
    dit = load_dit(path, "official", dtype)
    vae = load_vae(path / OFFICIAL_VAE, "official")
    return dit, vae, _official_text_encoder(path, dit.config.text_len)


def _load_causal(spec: ModelSpec, dtype: torch.dtype, export_precision: Optional[str] = None):
    """A causal-family preset's folder: its generator checkpoint (LoRA merged) + the Wan2.1 VAE and umT5."""
    from .causal_checkpoint import load_causal_generator

    dit = load_causal_generator(spec.family, dtype, precision=export_precision)
    vae = load_vae(spec.path / OFFICIAL_VAE, "official")
    text_encoder = _official_text_encoder(spec.path, dit.config.text_len)
    return dit, vae, text_encoder


def _official_text_encoder(path: Path, text_len: int) -> TextEncoder:
    t5 = require_file(path / OFFICIAL_T5, "official")
    tokenizer = path / OFFICIAL_TOKENIZER
    if not tokenizer.is_dir():
        raise FileNotFoundError(f"missing tokenizer folder {tokenizer} (expected by the official layout)")
    return load_text_encoder_official(t5, tokenizer, text_len=text_len)


def _load_diffusers(path: Path, dtype: torch.dtype):
    dit = load_dit(path / "transformer", "diffusers", dtype)
    vae = load_vae(path / "vae", "diffusers")
    text_encoder = load_text_encoder_diffusers(path / "text_encoder", path / "tokenizer", text_len=dit.config.text_len)
    return dit, vae, text_encoder


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())
