"""Train skyrt's demo model on the procedural world, on a CPU, and save it in the official layout.

    PYTHONPATH=demo python -m skyrt_demo.train --out DIR [--seed S] [--resume] [--vae-steps N] [--dit-steps N] ...

The model is the real architecture at a small size: the Wan2.1 VAE class (WanVAE, base width 8),
the SkyReels-V2 / Wan2.1 DiT class (WanDiT, dim 128, 4 layers, patch (1, 2, 2)) and a tiny umT5
encoder (transformers' UMT5EncoderModel) with a word-level tokenizer that holds every world word.
DIR/model is an ordinary official-layout folder: config.json, model.safetensors, Wan2.1_VAE.pth,
models_t5_umt5-xxl-enc-bf16.pth (fp32 despite the name: the name is what the loaders look for),
google/umt5-xxl/ (tokenizer), plus model_card.md and demo_model.json. `skyrt.load(DIR/model)` runs it.

Stages (each checkpointed with its optimizer state; `--resume` continues where a run stopped):
1. VAE: pixel L1 reconstruction on world clips (9 frames; 48 x 48 crops around the shape with
   whole 128 x 128 frames every 4th step; pixels on and around the shape weigh 3x, as they are few)
   plus a small KL term on the posterior (the decoder sees sampled latents, so it tolerates the
   DiT's errors), with a variance-preserving init (see `init_vae`) without which a VAE this narrow
   sits at the mean frame for hundreds of steps. Afterwards an exact affine
   re-parametrisation is folded into the VAE's 1x1x1 convs (conv1 rows of mu, conv2 columns) so
   that the fixed Wan2.1 normalisation of runtime/latents.py maps its latents to zero mean and
   unit overall variance: the DiT then sees what a real checkpoint's DiT sees.
2. Data: world clips of the TRAIN split (49 frames, 20% with a prompt switch at a latent-frame
   boundary), encoded once by the frozen VAE into model-space latents (fp16 shards under DIR/data).
3. DiT + text encoder, diffusion forcing with rectified flow, as the runtime samples it
   (runtime/scheduler.py): x_sigma = (1 - sigma) x0 + sigma noise, target velocity noise - x0,
   timestep t = 1000 sigma per frame. Crops of 4, 8 or 12 latent frames; a block size per batch
   (2 or 1: num_frame_per_block = 2 in config.json turns skyrt's causal attention on; block 1 is
   trained too so causal_block_size=1 also works) and an independent noise level per block
   (sometimes all equal, sometimes sorted so later blocks are noisier, as in the DF schedule);
   leading blocks are often clean context at t = 0 with no loss (what a KV cache commits). Crops that
   do not start at latent 0 always begin with clean context: the first latent of a video is a
   single encoded frame and only a block with no history may be one. Prompt-switch clips keep the
   blocks before the switch as clean context and are conditioned on the new prompt (what a
   stream sees after set_prompt; --switch-crop-share draws more of them). 10% empty prompts train the unconditional branch for CFG.
   AdamW with warm-up and cosine decay; EMA weights are what gets saved.
4. Export DIR/model and write its model card; 5. optionally (`--eval-clips N`) score held-out
   prompts with the detector over a small shift / guidance sweep and record the best as the
   recommended sampling settings.

Modules, one per phase: config.py (the settings) and cli.py (the command line); tokenizer.py;
data.py (world clips, encoded shards) and masks.py (loss masks); vae_ops.py, vae_phases.py and
vae_checks.py (stage 1); dit_batches.py, dit_growth.py and dit_phase.py (stage 3); sensitivity.py
(how much the DiT reads each prompt word); model_folder.py and model_card.py (stage 4);
evaluation.py (stage 5); trainer.py runs them in order; loop.py and checkpoints.py serve every
step loop. This file names the package's public pieces.

Smoke run (tests/test_demo_train.py does this): --vae-steps 3 --dataset-clips 4 --dit-steps 3 --size 64.
"""
from skyrt.export.dit import WanDiT  # the DiT class the trainer trains (tests build small ones through here)

from .checkpoints import load_checkpoint
from .cli import main, parse_args
from .config import ARCHITECTURE_FIELDS, TrainConfig, reproduce_command
from .data import LatentData
from .dit_batches import weighted_flow_loss
from .dit_growth import grown_dit_state
from .evaluation import DEFAULT_SAMPLING, SWEEP, evaluate
from .masks import OUTLINE_BAND, latent_fg_mask, shape_outline, shape_outline_band
from .model_card import CARD_NAME, META_NAME, MODEL_NAME, render_card
from .model_folder import MAX_MODEL_BYTES
from .sensitivity import SENSITIVITY_SIGMAS, prompt_sensitivity, swap_word
from .tokenizer import make_world_tokenizer
from .trainer import Trainer
from .vae_ops import fold_latent_affine, init_vae

__all__ = [
    "ARCHITECTURE_FIELDS", "CARD_NAME", "DEFAULT_SAMPLING", "LatentData", "MAX_MODEL_BYTES", "META_NAME", "MODEL_NAME",
    "OUTLINE_BAND", "SENSITIVITY_SIGMAS", "SWEEP", "TrainConfig", "Trainer", "WanDiT",
    "evaluate", "fold_latent_affine", "grown_dit_state", "init_vae", "latent_fg_mask",
    "load_checkpoint", "main", "make_world_tokenizer", "parse_args", "prompt_sensitivity", "render_card",
    "reproduce_command", "shape_outline", "shape_outline_band", "swap_word", "weighted_flow_loss",
]
