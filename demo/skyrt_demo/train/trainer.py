"""The Trainer: runs the stages in order, each resumable from its checkpoints (`--resume`).

1. VAE (vae_phases.py, measured by vae_checks.py); 2. data (data.py); 3. DiT and text encoder
(dit_batches.py, dit_phase.py); 4. the model folder and its card (model_folder.py, model_card.py);
5. optionally the sampling sweep (evaluation.py). Each stage is a mixin of its own module; this one
holds the run folder and the order.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from skyrt.export.dit import WanDiT
from skyrt.export.vae import WanVAE

from .config import ARCHITECTURE_FIELDS, TrainConfig
from .data import LatentShards
from .dit_batches import DiTBatches
from .dit_phase import DiTTraining
from .evaluation import evaluate
from .model_card import MODEL_NAME, write_card
from .model_folder import MAX_MODEL_BYTES, folder_bytes, write_official_layout
from .tokenizer import make_world_tokenizer
from .vae_checks import VAEChecks
from .vae_phases import VAETraining


class Trainer(VAETraining, VAEChecks, LatentShards, DiTBatches, DiTTraining):
    """One training run in the folder cfg.out: `run()` trains, exports and (optionally) evaluates."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.ck = self.out / "checkpoints"
        self.data_dir = self.out / "data"
        self.tokenizer_dir = self.out / "tokenizer"
        self.model_dir = Path(cfg.model_out).expanduser() if cfg.model_out else self.out / "model"
        self.summary: dict = {}

    # -- run --------------------------------------------------------------------------------
    def run(self) -> Path:
        torch.set_num_threads(self.cfg.threads)
        self._prepare_out()
        t0 = time.time()
        vae = self.train_vae()
        data = self.build_data(vae)
        dit, text_model = self.train_dit(data)
        self.summary["wall_seconds"] = self.summary.get("wall_seconds_before", 0.0) + time.time() - t0
        model_dir = self.export(vae, dit, text_model)
        if self.cfg.eval_clips > 0:
            self.summary["eval"] = evaluate(model_dir, self.cfg)
            self._write_card(model_dir)
        return model_dir

    def _prepare_out(self) -> None:
        run_file = self.out / "run.json"
        if run_file.exists():
            if not self.cfg.resume:
                raise FileExistsError(f"{self.out} already holds a run: pass --resume to continue it, "
                                      "or choose another --out")
            old = json.loads(run_file.read_text())
            changed = [k for k in ARCHITECTURE_FIELDS if old["config"].get(k) != getattr(self.cfg, k)]
            if changed:
                raise ValueError(f"--resume with different {', '.join(changed)} than the run in {self.out}")
            self.summary["wall_seconds_before"] = float(old.get("wall_seconds", 0.0))
        self.ck.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"config": self.cfg.to_json(),
                                        "wall_seconds": self.summary.get("wall_seconds_before", 0.0)}, indent=2))
        if not (self.tokenizer_dir / "tokenizer.json").is_file():
            make_world_tokenizer(self.tokenizer_dir)

    # -- stage 4: export ---------------------------------------------------------------------------
    def export(self, vae: WanVAE, dit: WanDiT, text_model) -> Path:
        """Write DIR/model in the official layout (atomically: a half-written folder never replaces one)."""
        tmp = self.model_dir.with_name(self.model_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write_official_layout(tmp, vae, dit, text_model, self.tokenizer_dir, MODEL_NAME)
        self.summary["model_bytes"] = folder_bytes(tmp)
        self._write_card(tmp)
        if self.model_dir.exists():
            shutil.rmtree(self.model_dir)
        os.replace(tmp, self.model_dir)
        run_file = self.out / "run.json"
        run = json.loads(run_file.read_text())
        run["wall_seconds"] = self.summary.get("wall_seconds", 0.0)
        run_file.write_text(json.dumps(run, indent=2))
        if self.summary["model_bytes"] > MAX_MODEL_BYTES:
            raise RuntimeError(f"the model folder is {self.summary['model_bytes'] / 2**20:.1f} MiB, over the "
                               f"{MAX_MODEL_BYTES / 2**20:.0f} MiB budget: use a smaller --dit-dim / --dit-layers")
        return self.model_dir

    def _write_card(self, folder: Path) -> None:
        write_card(folder, self.cfg, self.summary)
