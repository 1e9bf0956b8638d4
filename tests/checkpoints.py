"""Tiny random checkpoints in BOTH layouts, holding the same weights, built from diffusers' classes.

The diffusers pipeline object built here is the oracle; its weights are also written in the
official layout (renamed with skyrt's key maps, whose correctness test_dit/test_vae establish
against diffusers) so every loader path is exercised with real files.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import types
from pathlib import Path

import torch

from skyrt.export.checkpoint import rename_keys
from skyrt.export.dit import diffusers_to_official_key
from skyrt.export.text_encoder import load_tokenizer, make_tiny_tokenizer, umt5_config_for_official
from skyrt.export.tiny import randomize_, umt5_official_state_dict
from skyrt.export.vae import convert_diffusers_vae_state_dict
from skyrt.runtime.model_folder import OFFICIAL_T5, OFFICIAL_TOKENIZER, OFFICIAL_VAE

TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, inject_sample_info=False, num_frame_per_block=1,
)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True])
TEXT_LEN = 512  # the real text_len: the context is zero-padded to it

# The official SkyReels-V2 source (an unpacked skyreels_v2_infer folder), an extra oracle when present.
OFFICIAL_DIR = Path(os.environ.get("SKYRT_OFFICIAL_DIR", "/nonexistent"))  # unset: those tests skip
_OFFICIAL_PACKAGE = "_skyrt_official_modules"


def import_official_module(name: str):
    """Import official modules/<name>.py without running the package __init__ (heavy imports)."""
    if _OFFICIAL_PACKAGE not in sys.modules:
        package = types.ModuleType(_OFFICIAL_PACKAGE)
        package.__path__ = [str(OFFICIAL_DIR / "modules")]
        sys.modules[_OFFICIAL_PACKAGE] = package
    return importlib.import_module(f"{_OFFICIAL_PACKAGE}.{name}")


def randomize_scaled_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter non-trivial, at scales that keep a deep model's activations O(1): matrices
    ~ 1/sqrt(fan_in), norm gains 1 + N(0, 0.2), other vectors (biases, modulation tables, embeddings)
    N(0, 0.3). Default inits leave zeros/ones that hide bugs. Works on official and diffusers names."""
    gen = torch.Generator().manual_seed(seed)
    vector_like = ("modulation", "scale_shift_table", "embedding.weight")
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2 and not any(tag in name for tag in vector_like):
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return module


def official_scheduler_config() -> dict:
    """diffusers UniPC settings that reproduce the official FlowUniPCMultistepScheduler
    when driven with the official shifted sigmas (see tests/test_scheduler.py)."""
    return dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, num_train_timesteps=1000,
                solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True)


def build_diffusers_pipeline(workdir: Path, seed: int = 0, **transformer_overrides):
    """A SkyReelsV2DiffusionForcingPipeline with tiny random weights (fp32, CPU)."""
    from diffusers import AutoencoderKLWan, SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Transformer3DModel
    from diffusers import UniPCMultistepScheduler
    from transformers import UMT5EncoderModel

    tokenizer = load_tokenizer(make_tiny_tokenizer(workdir / "tokenizer-src"))
    text_encoder = randomize_(UMT5EncoderModel(umt5_config_for_official("tiny")), seed + 2).eval()
    transformer = randomize_(
        SkyReelsV2Transformer3DModel(**{**TINY_TRANSFORMER, **transformer_overrides}), seed
    ).eval()
    vae = randomize_(AutoencoderKLWan(**TINY_VAE), seed + 1).eval()
    scheduler = UniPCMultistepScheduler(**official_scheduler_config())
    return SkyReelsV2DiffusionForcingPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )



def mid_size_model(workdir: Path, dim: int, layers: int):
    """The benchmarks' random model: a diffusers pipeline with a dim-wide DiT (heads of 64 channels,
    FFN 4 x dim) and its weights in the diffusers layout. Returns (pipeline, model folder)."""
    heads = max(1, dim // 64)
    oracle = build_diffusers_pipeline(Path(workdir), num_attention_heads=heads, attention_head_dim=dim // heads,
                                      ffn_dim=4 * dim, num_layers=layers)
    return oracle, write_diffusers_layout(oracle, Path(workdir) / "model")

def write_diffusers_layout(pipe, out: Path) -> Path:
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def write_official_layout(pipe, out: Path, num_shards: int = 2) -> Path:
    """The same weights as `pipe`, in the official SkyReels-V2 folder layout."""
    from safetensors.torch import save_file

    from skyrt.export.tiny import _save_shards

    out.mkdir(parents=True, exist_ok=True)
    cfg = pipe.transformer.config
    config = {
        "_class_name": "WanModel", "model_type": "i2v" if cfg.image_dim else "t2v", "text_len": TEXT_LEN,
        "in_dim": cfg.in_channels, "dim": cfg.num_attention_heads * cfg.attention_head_dim, "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim, "out_dim": cfg.out_channels, "num_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_layers, "eps": cfg.eps, "inject_sample_info": cfg.inject_sample_info,
        "text_dim": cfg.text_dim,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    dit_state = rename_keys(pipe.transformer.state_dict(), diffusers_to_official_key)
    _save_shards({k: v.contiguous() for k, v in dit_state.items()}, out, num_shards, save_file)
    torch.save(convert_diffusers_vae_state_dict(pipe.vae.state_dict()), out / OFFICIAL_VAE)
    torch.save(umt5_official_state_dict(pipe.text_encoder), out / OFFICIAL_T5)
    pipe.tokenizer.save_pretrained(out / OFFICIAL_TOKENIZER)
    return out


def official_sigmas_scheduler(shift: float):
    """diffusers' UniPC that always schedules the official shifted sigmas (which makes it the
    official FlowUniPCMultistepScheduler; tests/test_scheduler.py checks that).

    The diffusers DF pipeline calls set_timesteps(num_inference_steps) itself; this subclass turns
    that into set_timesteps(sigmas=<official sigmas>), which reproduces the official sampler.
    """
    from diffusers import UniPCMultistepScheduler

    from skyrt.runtime.scheduler import shifted_sigmas

    class OfficialSigmasUniPC(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            # float64, as the official set_timesteps has them before truncating the timesteps.
            super().set_timesteps(sigmas=shifted_sigmas(num_inference_steps, shift), device=device)

    return OfficialSigmasUniPC(**official_scheduler_config())
