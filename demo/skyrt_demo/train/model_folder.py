"""Stage 4: the trained model as an official-layout model folder (what `skyrt.load` reads)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from skyrt.export.dit import WanDiT
from skyrt.export.tiny import umt5_official_state_dict
from skyrt.export.vae import WanVAE
from skyrt.runtime.model_folder import OFFICIAL_T5, OFFICIAL_TOKENIZER, OFFICIAL_VAE

MAX_MODEL_BYTES = 30 * 1024 * 1024


def write_official_layout(folder: Path, vae: WanVAE, dit: WanDiT, text_model, tokenizer_dir: Path, name: str) -> None:
    """config.json, model.safetensors, the VAE and umT5 .pth files and the tokenizer folder, into `folder`."""
    from safetensors.torch import save_file

    (folder / "config.json").write_text(json.dumps(dit.config.to_official(), indent=2))
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt", "model": name})
    torch.save(vae.state_dict(), folder / OFFICIAL_VAE)
    torch.save(umt5_official_state_dict(text_model), folder / OFFICIAL_T5)
    shutil.copytree(tokenizer_dir, folder / OFFICIAL_TOKENIZER)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
