"""The model folder's model_card.md and demo_model.json: what the model is, its data, objective,
hyper-parameters, measured losses and recommended sampling."""
from __future__ import annotations

import json
from pathlib import Path

from skyrt.runtime.model_folder import OFFICIAL_T5, OFFICIAL_TOKENIZER, OFFICIAL_VAE

from .. import world as W
from .config import TrainConfig, reproduce_command
from .evaluation import DEFAULT_SAMPLING
from .sensitivity import SENSITIVITY_SIGMAS

MODEL_NAME = "skyrt-demo-world-v6"
CARD_NAME = "model_card.md"
META_NAME = "demo_model.json"


def recommended_without_sweep(cfg: TrainConfig) -> dict:
    """The sampling settings a run recommends when no sweep measured better ones."""
    return {**DEFAULT_SAMPLING, "guidance_scale": cfg.recommend_guidance}


def write_card(folder: Path, cfg: TrainConfig, summary: dict) -> None:
    """demo_model.json (the run's settings, summary and recommended sampling) and model_card.md in `folder`."""
    meta = {"name": MODEL_NAME, "config": cfg.to_json(), "summary": summary,
            "recommended": summary.get("eval", {}).get("best", recommended_without_sweep(cfg))}
    for key in ("out", "model_out", "resume", "progress"):  # where and how it ran, not what it is
        meta["config"].pop(key, None)
    if cfg.dit_init:  # the file it started from, not this machine's path to it
        meta["config"]["dit_init"] = Path(cfg.dit_init).name
    (folder / META_NAME).write_text(json.dumps(meta, indent=2))
    (folder / CARD_NAME).write_text(render_card(cfg, summary, meta["recommended"]))


def render_card(cfg: TrainConfig, summary: dict, recommended: dict) -> str:
    """model_card.md: what the model is, its data, objective, hyper-parameters and measured losses."""
    vae, data, dit = summary.get("vae", {}), summary.get("data", {}), summary.get("dit", {})
    fmt = lambda v: "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [
        f"# {MODEL_NAME}: skyrt's demo model",
        "",
        "A tiny text-to-video model of the SkyReels-V2 / Wan2.1 architecture, trained from scratch on a CPU on",
        "skyrt's procedural world (`skyrt_demo.world`): one flat-coloured shape moving over a",
        "striped plain background, sometimes under a camera pan. It follows prompts such as",
        f"\"{W.EXAMPLE.prompt}\" and nothing else: it is a demo and a test fixture, not a general model.",
        "",
        "## Files (official SkyReels-V2 layout; `skyrt.load(this_folder)`)",
        "- `config.json`, `model.safetensors`: WanDiT "
        f"(dim {cfg.dit_dim}, {cfg.dit_layers} layers, {cfg.dit_heads} heads, ffn {cfg.dit_ffn}, patch (1, 2, 2), "
        f"text_len {cfg.text_len}, num_frame_per_block {cfg.num_frame_per_block} = block-causal attention), "
        f"{fmt(dit.get('params'))} parameters",
        f"- `{OFFICIAL_VAE}`: WanVAE, base width {cfg.vae_dim}, {cfg.vae_res_blocks} residual block(s) per stage, "
        "8x spatial / 4x temporal, 16 latent channels",
        f"- `{OFFICIAL_T5}`: umT5 encoder (d_model {cfg.text_dim}, {cfg.text_layers} layers), fp32 despite the "
        f"name; `{OFFICIAL_TOKENIZER}/`: a tokenizer holding every world word as one piece",
        f"- total {fmt(summary.get('model_bytes', 0) / 2**20)} MiB",
        "",
        "## Data",
        f"Train split of the world's attribute combinations ({len(W.combinations('train'))} of "
        f"{len(W.all_combinations())}); held out: every combination with a (colour, shape) pair in "
        f"{sorted(W.HELDOUT_COLOUR_SHAPE)} or a (motion, background) pair in {sorted(W.HELDOUT_MOTION_BACKGROUND)}.",
        f"{fmt(data.get('clips'))} clips of {cfg.clip_frames} frames at {cfg.size}x{cfg.size} "
        f"({fmt(data.get('switch_clips'))} with a prompt switch), encoded once by the trained VAE.",
        "",
        "## Objective",
        "- VAE: L1 reconstruction (shape pixels weighted " f"{1 + cfg.vae_fg_weight:g}x) + KL (weight {cfg.vae_kl}) "
        f"on {cfg.vae_frames}-frame clips, {cfg.vae_crop}px crops and whole frames, then {cfg.vae_long_steps} steps on "
        f"{cfg.vae_long_frames}-frame clips ({cfg.vae_long_crop}px crops) so the causal VAE is stationary on long "
        "streams (short clips alone leave every chunk after the third off); after each, an exact affine fold so "
        "the Wan2.1 latent normalisation standardises its latents."
        + (f" Then {cfg.vae_decoder_steps} steps of the decoder alone on {cfg.vae_long_frames}-frame clips (encoder "
           f"frozen, so the latent space stays put), the shape's outline weighted {cfg.vae_edge_weight:g}x more."
           if cfg.vae_decoder_steps else ""),
        "- DiT: diffusion forcing with rectified flow: x = (1 - sigma) x0 + sigma noise, target noise - x0, "
        "t = 1000 sigma per frame; an independent noise level per causal block; block-causal attention "
        f"(block sizes {cfg.block_sizes}); crops of {cfg.crop_frames} latent frames; leading blocks often clean "
        f"context at t = 0; {int(cfg.empty_prompt * 100)}% empty prompts (classifier-free guidance); EMA {cfg.ema}; "
        f"latent pixels on the shape (from the world's ground truth) weighted {1 + cfg.dit_fg_weight:g}x"
        + (f", on its outline {1 + cfg.dit_fg_weight + cfg.dit_edge_weight:g}x." if cfg.dit_edge_weight else ".")
        + (f" Extra shares of crops: {cfg.text_only_share:.0%} stream starts with no context, "
           f"{cfg.switch_crop_share:.0%} prompt switches." if cfg.text_only_share or cfg.switch_crop_share else ""),
        "",
        "## Training run",
        f"- seed {cfg.seed}; VAE {cfg.vae_steps} + {cfg.vae_long_steps} steps (batch {cfg.vae_batch} / "
        f"{cfg.vae_long_batch}, lr {cfg.vae_lr} / {cfg.vae_long_lr})"
        + (f" + {cfg.vae_decoder_steps} decoder-only steps (lr {cfg.vae_decoder_lr})" if cfg.vae_decoder_steps else "")
        + "; "
        f"DiT {fmt(dit.get('steps'))} steps ({cfg.dit_batch_frames} latent frames per batch, lr {cfg.dit_lr}, "
        f"text lr {cfg.text_lr}, warm-up {cfg.warmup}, cosine to 10%, train shift {cfg.train_shift})",
        f"- VAE L1 (pixels in [-1, 1], shape-weighted): {fmt(vae.get('l1_start'))} -> {fmt(vae.get('l1_end'))} "
        f"(mean of the first / last 50 steps); on a fixed probe batch {fmt(vae.get('probe_l1_start'))} -> "
        f"{fmt(vae.get('probe_l1_end'))}; whole-frame L1 after the fold {fmt(vae.get('recon_l1_128'))}; "
        f"normalised latent std {fmt(vae.get('normalised_std'))}; a still 49-frame clip decodes with L1 "
        f"{fmt(vae.get('stationarity', {}).get('decoded_l1_first16'))} in its first 16 frames and "
        f"{fmt(vae.get('stationarity', {}).get('decoded_l1_last16'))} in its last 16",
        f"- DiT flow-matching loss: {fmt(dit.get('loss_start'))} -> {fmt(dit.get('loss_end'))} (first / last 50 "
        f"steps); on a fixed probe batch {fmt(dit.get('probe_loss_start'))} -> {fmt(dit.get('probe_loss_end'))} "
        f"(EMA weights, the ones saved: {fmt(dit.get('probe_loss_end_ema'))})",
        *([] if not dit.get("prompt_sensitivity") else [
            "- prompt sensitivity at a stream's start (x0 error on the shape's latent pixels with one prompt word "
            "swapped, over the error with the true prompt; 1.00 = the DiT ignores that word), at sigma "
            + " / ".join(f"{s:g}" for s in SENSITIVITY_SIGMAS) + ": "
            + "; ".join(f"{name} " + " / ".join(f"{r:.2f}" for r in ratios.values())
                        for name, ratios in dit["prompt_sensitivity"].items())]),
        f"- wall time {fmt(summary.get('wall_seconds', 0) / 60)} min with {cfg.threads} CPU thread{'s' if cfg.threads != 1 else ''}",
        f"- reproduce: `{reproduce_command(cfg)}`" + (" (`--dit-init` names an earlier run's DiT checkpoint, see "
                                                       "below)" if cfg.dit_init else ""),
        "",
        "## Sampling",
        "Recommended (" + ("measured by the sweep below" if "eval" in summary
                           else "guidance from --recommend-guidance, chosen with benchmarks/quality.py"
                           if cfg.recommend_guidance != 1.0 else "not yet measured") + "): "
        + ", ".join(f"{k}={v}" for k, v in recommended.items()) + f", at {cfg.size}x{cfg.size}.",
    ]
    ev = summary.get("eval")
    if ev:
        lines += ["", f"Detector adherence on {ev['clips_per_setting']} held-out prompts per setting "
                  f"({ev['frames_per_clip']}-frame streams; generated frames/s on the training machine, "
                  f"{cfg.threads} thread(s), start-up included):", "",
                  "| shift | guidance | adherence | " + " | ".join(W.ATTRIBUTE_NAMES) + " | fps |",
                  "|---|---|---|" + "---|" * len(W.ATTRIBUTE_NAMES) + "---|"]
        for r in ev["results"]:
            s = r["settings"]
            lines.append(f"| {s['shift']} | {s['guidance_scale']} | {r['adherence']:.3f} | "
                         + " | ".join(f"{r['per_attribute'][n]:.2f}" for n in W.ATTRIBUTE_NAMES)
                         + f" | {r['generated_fps']:.1f} |")
    lines += ["", "Quality over long streams: `python benchmarks/quality.py --model THIS_FOLDER`.", ""]
    return "\n".join(lines)
