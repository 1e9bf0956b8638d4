"""Tiny random-weight checkpoints of the real architecture, written in the official layout.

Tests use them (with the real loaders) because no real weights can be downloaded here, and
`skyrt serve` falls back to one when the package holds no trained demo model (runtime/models/). The
weights are random: the video they make is structured noise, not content.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from skyrt.runtime.artifact_cache import cache_root, publish
from skyrt.runtime.model_folder import OFFICIAL_T5, OFFICIAL_TOKENIZER, OFFICIAL_VAE

from . import dit as dit_module
from . import vae as vae_module
from .text_encoder import make_tiny_tokenizer, umt5_config_for_official

DEFAULT_MODEL_NAME = "tiny-random-v2"


def randomize_(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Give every parameter non-trivial random values (norm gains near 1, others N(0, std)).

    Default inits leave zeros (modulation tables, output heads) that would hide bugs in tests.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            is_gain = param.ndim == 1 and ("norm" in name or name.endswith("gamma"))
            param.copy_(1.0 + 0.1 * noise if is_gain else std * noise)
    return module


def umt5_official_state_dict(model) -> dict[str, torch.Tensor]:
    """A transformers UMT5EncoderModel's weights under the official checkpoint's key names."""
    from .text_encoder import official_umt5_expected_shapes, official_umt5_key_to_transformers

    theirs = model.state_dict()
    return {k: theirs[official_umt5_key_to_transformers(k)].clone() for k in official_umt5_expected_shapes(model.config)}


def write_official_checkpoint(
    out_dir: str | Path,
    dit_config: "dit_module.DiTConfig | None" = None,
    vae_config: "vae_module.VAEConfig | None" = None,
    t5_size: str = "tiny",
    seed: int = 0,
    num_shards: int = 1,
) -> Path:
    """Write config.json, DiT safetensors shard(s), Wan2.1_VAE.pth, the umT5 .pth and a tokenizer."""
    from safetensors.torch import save_file
    from transformers import UMT5EncoderModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = make_tiny_tokenizer(out / OFFICIAL_TOKENIZER)
    t5 = randomize_(UMT5EncoderModel(umt5_config_for_official(t5_size)), seed + 2)
    dit_config = replace(dit_config or dit_module.TINY, text_dim=t5.config.d_model)
    dit = randomize_(dit_module.WanDiT(dit_config), seed)
    # A wider VAE init than the default 0.05: small random decoders output flat grey.
    vae = randomize_(vae_module.WanVAE(vae_config or vae_module.TINY), seed + 1, std=0.2)

    (out / "config.json").write_text(json.dumps(dit_config.to_official(), indent=2))
    state = {k: v.contiguous() for k, v in dit.state_dict().items()}
    _save_shards(state, out, num_shards, save_file)
    torch.save(vae.state_dict(), out / OFFICIAL_VAE)
    torch.save(umt5_official_state_dict(t5), out / OFFICIAL_T5)
    assert tokenizer_dir.is_dir()
    return out


def _save_shards(state: dict, out: Path, num_shards: int, save_file) -> None:
    if num_shards == 1:
        save_file(state, str(out / "model.safetensors"))
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = keys[i::num_shards]
        save_file({k: state[k] for k in part}, str(out / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def ensure_default_model(cache_dir: str | Path | None = None) -> Path:
    """The built-in default model folder, written once into skyrt's cache (runtime/artifact_cache.py:
    $SKYRT_CACHE or ~/.cache/skyrt), published whole so a half-written folder is never taken for a model."""
    target = cache_root(cache_dir) / DEFAULT_MODEL_NAME
    return publish(target, lambda staging: write_official_checkpoint(staging, seed=0),
                   lambda folder: (folder / "config.json").is_file())
